//! Unsigned LEB128 varints: how protobuf and postcard write integers, and how a series' recent
//! point keys are held ([`crate::seen`]). One writer and one reader for the decoder of OTLP
//! ([`crate::decode`]), the point keys, and the node's stored records.

/// Appends `value`: seven bits per byte, least significant first, the high bit set on every
/// byte but the last.
#[inline]
pub fn push(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// The varint at the start of `bytes` and how many bytes it took; `None` when it is cut short or
/// does not fit a `u64` (more than 10 bytes, or a tenth byte above 1), which protobuf's decoders
/// refuse too.
#[inline]
pub fn read(bytes: &[u8]) -> Option<(u64, usize)> {
    // Keys, lengths and small values take one byte: that case is inlined where varints are read.
    match bytes.first() {
        Some(&byte) if byte < 0x80 => Some((u64::from(byte), 1)),
        _ => read_long(bytes),
    }
}

fn read_long(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (index, &byte) in bytes.iter().enumerate().take(10) {
        if index == 9 && byte > 1 {
            return None;
        }
        value |= u64::from(byte & 0x7f) << (7 * index);
        if byte < 0x80 {
            return Some((value, index + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_read_back_what_was_pushed_and_refuse_what_does_not_fit() {
        for value in [0, 1, 0x7f, 0x80, 300, u64::from(u32::MAX), 1 << 63, u64::MAX] {
            let mut bytes = Vec::new();
            push(&mut bytes, value);
            assert_eq!(read(&bytes), Some((value, bytes.len())), "{value}");
            bytes.push(0x05);
            assert_eq!(read(&bytes), Some((value, bytes.len() - 1)), "{value} followed by more");
            assert_eq!(read(&bytes[..bytes.len() - 2]), None, "{value} cut short");
        }
        assert_eq!(read(&[0xac, 0x02]), Some((300, 2)));
        assert_eq!(read(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]), None);
        assert_eq!(read(&[0xff; 11]), None);
        assert_eq!(read(&[]), None);
    }
}
