//! Fixed-point decimal numbers with nine fractional digits.
//!
//! Every sum Tollgate keeps (seconds, tokens, cost) is a [`Fixed`]: an `i128` count of
//! billionths. Adding integers is exact, associative and commutative, so a minute merged
//! in any order, on any node, in any grouping, gives the same bits. Floating-point sums
//! would not (`0.1 + (0.2 + 0.3) != (0.1 + 0.2) + 0.3`), and a cumulative series turned
//! into deltas would leak rounding errors into every minute (`12.4 - 8.2 = 4.200000000000001`).
//!
//! OTLP carries `f64`; a value enters as the nearest billionth, which is far below any
//! resolution the gateway measures (durations are nanosecond clocks at best, token counts are
//! integers, prices have a handful of decimals).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::{Add, AddAssign, Neg, Sub};

/// Number of fixed units in one whole unit.
pub const FIXED_SCALE: i128 = 1_000_000_000;

/// The largest magnitude (in whole units) accepted from an input value.
///
/// 10^17 leaves room for ten billion merges of maximal values before an `i128` could
/// overflow, and for multiplying a sum by a price (see [`Fixed::mul_price`]).
pub const FIXED_MAX_UNITS: f64 = 1e17;

/// A decimal number with nine fractional digits, stored as an integer count of 10^-9.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Fixed(i128);

impl Fixed {
    /// Zero.
    pub const ZERO: Fixed = Fixed(0);

    /// A value from its raw count of billionths.
    pub const fn from_nanos(nanos: i128) -> Fixed {
        Fixed(nanos)
    }

    /// The raw count of billionths.
    pub const fn nanos(self) -> i128 {
        self.0
    }

    /// A whole number.
    pub const fn from_int(value: i64) -> Fixed {
        Fixed(value as i128 * FIXED_SCALE)
    }

    /// The nearest fixed value to `value`, or `None` when it is NaN, infinite, or larger in
    /// magnitude than [`FIXED_MAX_UNITS`].
    ///
    /// The integer part converts exactly; only the fraction is rounded (half away from zero),
    /// so large integral values such as token sums never pick up an error.
    pub fn from_f64(value: f64) -> Option<Fixed> {
        if !value.is_finite() || value.abs() > FIXED_MAX_UNITS {
            return None;
        }
        let whole = value.trunc();
        let fraction = ((value - whole) * FIXED_SCALE as f64).round();
        Some(Fixed(whole as i128 * FIXED_SCALE + fraction as i128))
    }

    /// The closest `f64`. Exact for values whose integer part fits in 2^53 and whose fraction
    /// has at most a few significant digits; otherwise the nearest double.
    pub fn to_f64(self) -> f64 {
        let whole = self.0 / FIXED_SCALE;
        let fraction = self.0 % FIXED_SCALE;
        whole as f64 + fraction as f64 / FIXED_SCALE as f64
    }

    /// `self × price`, where both are fixed values, rounded to the nearest billionth.
    ///
    /// The split into whole and fractional parts keeps the product inside `i128` for every
    /// value [`Fixed::from_f64`] accepts and every price the pricing validation accepts, and
    /// makes integral token counts times a price exact.
    pub fn mul_price(self, price: Fixed) -> Fixed {
        let whole = self.0 / FIXED_SCALE;
        let fraction = self.0 % FIXED_SCALE;
        let fraction_product = fraction * price.0;
        let rounded = (fraction_product + fraction_product.signum() * (FIXED_SCALE / 2)) / FIXED_SCALE;
        Fixed(whole.saturating_mul(price.0).saturating_add(rounded))
    }

    /// Saturating addition (an overflow would need ~10^12 maximal values in one state).
    pub fn saturating_add(self, other: Fixed) -> Fixed {
        Fixed(self.0.saturating_add(other.0))
    }

    /// True for zero.
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// True below zero.
    pub fn is_negative(self) -> bool {
        self.0 < 0
    }
}

impl Add for Fixed {
    type Output = Fixed;
    fn add(self, other: Fixed) -> Fixed {
        self.saturating_add(other)
    }
}

impl AddAssign for Fixed {
    fn add_assign(&mut self, other: Fixed) {
        *self = self.saturating_add(other);
    }
}

impl Sub for Fixed {
    type Output = Fixed;
    fn sub(self, other: Fixed) -> Fixed {
        Fixed(self.0.saturating_sub(other.0))
    }
}

impl Neg for Fixed {
    type Output = Fixed;
    fn neg(self) -> Fixed {
        Fixed(-self.0)
    }
}

impl fmt::Display for Fixed {
    /// Decimal notation without trailing zeros: `3.242`, `-0.5`, `17969`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let magnitude = self.0.unsigned_abs();
        let whole = magnitude / FIXED_SCALE as u128;
        let fraction = magnitude % FIXED_SCALE as u128;
        if fraction == 0 {
            return write!(f, "{sign}{whole}");
        }
        let digits = format!("{fraction:09}");
        write!(f, "{sign}{whole}.{}", digits.trim_end_matches('0'))
    }
}

impl fmt::Debug for Fixed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_fixed_from_f64_rounds_to_nearest_billionth() {
        assert_eq!(Fixed::from_f64(3.242).unwrap().nanos(), 3_242_000_000);
        assert_eq!(Fixed::from_f64(-0.5).unwrap().nanos(), -500_000_000);
        assert_eq!(Fixed::from_f64(10.432428).unwrap().nanos(), 10_432_428_000);
        assert_eq!(Fixed::from_f64(1e-10).unwrap().nanos(), 0);
        assert_eq!(Fixed::from_f64(6e-10).unwrap().nanos(), 1);
    }

    #[test]
    fn test_fixed_from_f64_keeps_large_integers_exact() {
        let v = 9_007_199_254_740_993f64; // rounds to 2^53 + 0 or 2 as f64; the f64 itself is integral
        assert_eq!(Fixed::from_f64(v).unwrap().nanos(), v as i128 * FIXED_SCALE);
        assert_eq!(Fixed::from_f64(1e17).unwrap().nanos(), 100_000_000_000_000_000 * FIXED_SCALE);
    }

    #[test]
    fn test_fixed_from_f64_rejects_non_finite_and_huge() {
        assert!(Fixed::from_f64(f64::NAN).is_none());
        assert!(Fixed::from_f64(f64::INFINITY).is_none());
        assert!(Fixed::from_f64(f64::NEG_INFINITY).is_none());
        assert!(Fixed::from_f64(1.0e18).is_none());
    }

    #[test]
    fn test_fixed_subtraction_is_exact_where_f64_is_not() {
        let a = Fixed::from_f64(12.4).unwrap();
        let b = Fixed::from_f64(8.2).unwrap();
        assert_ne!(12.4f64 - 8.2, 4.2);
        assert_eq!(a - b, Fixed::from_f64(4.2).unwrap());
    }

    #[test]
    fn test_fixed_mul_price_is_exact_for_integral_tokens() {
        let tokens = Fixed::from_int(17_969);
        let price = Fixed::from_f64(0.4).unwrap();
        assert_eq!(tokens.mul_price(price), Fixed::from_f64(7187.6).unwrap());
        let price = Fixed::from_f64(0.28).unwrap();
        assert_eq!(Fixed::from_int(2000).mul_price(price), Fixed::from_int(560));
        let negative = Fixed::from_f64(-1.25).unwrap();
        assert_eq!(Fixed::from_int(1000).mul_price(negative), Fixed::from_int(-1250));
    }

    #[test]
    fn test_fixed_mul_price_rounds_fraction_half_away_from_zero() {
        let half_nano_product = Fixed::from_nanos(1).mul_price(Fixed::from_f64(0.5).unwrap());
        assert_eq!(half_nano_product.nanos(), 1);
        let negative = Fixed::from_nanos(-1).mul_price(Fixed::from_f64(0.5).unwrap());
        assert_eq!(negative.nanos(), -1);
    }

    #[test]
    fn test_fixed_display_trims_trailing_zeros() {
        assert_eq!(Fixed::from_f64(3.242).unwrap().to_string(), "3.242");
        assert_eq!(Fixed::from_int(17969).to_string(), "17969");
        assert_eq!(Fixed::from_f64(-0.05).unwrap().to_string(), "-0.05");
    }

    #[test]
    fn test_fixed_to_f64_round_trips_decimal_inputs() {
        for v in [0.0, 1.5, 3.242, 814_071.91, -2.75, 1e12] {
            assert_eq!(Fixed::from_f64(v).unwrap().to_f64(), v);
        }
    }
}
