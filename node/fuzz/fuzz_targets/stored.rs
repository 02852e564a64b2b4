//! What a node reads back from its own disk and from its peers: store records, write-ahead log
//! entries and forwarded points. Corrupt bytes are an error, never a panic; what decodes encodes
//! back to what decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use tollgate::store::{codec, wal};
use tollgate::wire;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let bounds = |_| Some(Arc::from(vec![1.0, 2.5, 10.0]));
    match which % 8 {
        0 => {
            if let Ok(state) = codec::decode_state(bytes, bounds) {
                let (encoded, _) = codec::encode_state(&state);
                let again = codec::decode_state(&encoded, bounds).expect("an encoded state decodes");
                assert_eq!(format!("{state:?}"), format!("{again:?}"));
            }
        }
        1 => {
            if let Ok(cursor) = codec::decode_cursor(bytes, 0, bounds) {
                let (encoded, _) = codec::encode_cursor(&cursor);
                let again = codec::decode_cursor(&encoded, 0, bounds).expect("an encoded cursor decodes");
                assert_eq!(format!("{cursor:?}"), format!("{again:?}"));
            }
        }
        2 => {
            let _ = wal::decode_entries(bytes, &mut |key, logged| logged.resolve(Some(&key)).map(drop));
        }
        3 => {
            let _ = wire::decode_points(bytes);
        }
        4 => {
            let _ = (wire::count_data_points(bytes), wire::count_log_records(bytes));
        }
        5 => {
            let _ = (codec::decode_series(bytes), codec::decode_clock(bytes));
        }
        6 => {
            let _ = (codec::decode_log(bytes), codec::decode_entity(bytes));
        }
        _ => {
            let _ = (codec::series_key_id(bytes), codec::key_partition(bytes), codec::state_key_period(bytes));
            let _ = (
                codec::log_key_time(bytes),
                codec::log_batch_key_fingerprint(bytes),
                codec::entity_key_partition(bytes),
            );
        }
    }
});
