//! bfloat16 rounding. A bfloat16 is the upper half of an f32 bit pattern (sign, 8 exponent bits,
//! 7 mantissa bits), so a value is rounded the way a GPU converts an f32 register
//! (`__float2bfloat16_rn`): first to f32, then to bfloat16, each step to nearest with ties to
//! even. Rounding twice can differ from rounding an f64 straight to bfloat16 when the first step
//! lands exactly on a bfloat16 midpoint; the two-step result is the one the kernels produce.

/// `x` rounded to the nearest bfloat16 value via f32 (ties to even at both steps); values
/// beyond the largest bfloat16 round to ±infinity as IEEE rounding does; NaN stays NaN.
pub fn round_bf16(x: f64) -> f64 {
    let single = x as f32;
    if single.is_nan() {
        return x;
    }
    f64::from(f32::from_bits(round_bits_to_bf16(single.to_bits())))
}

/// The bfloat16 bit pattern of `x`, rounded as [`round_bf16`] rounds (the storage of a packed
/// bf16 buffer).
pub fn bf16_bits(x: f32) -> u16 {
    ((round_bf16(f64::from(x)) as f32).to_bits() >> 16) as u16
}

/// The value of a bfloat16 bit pattern.
pub fn from_bf16_bits(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Rounds a non-NaN f32 bit pattern to its upper 16 bits, to nearest with ties to even: adding
/// 0x7fff plus the lowest kept bit carries into the kept bits exactly when the dropped half is
/// above 0x8000, or equal to it with an odd kept part. A carry out of the mantissa moves to the
/// next binade, and from the largest finite value to infinity.
fn round_bits_to_bf16(bits: u32) -> u32 {
    let lowest_kept_bit = (bits >> 16) & 1;
    (bits + 0x7fff + lowest_kept_bit) & 0xffff_0000
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn round_f32_bits(bits: u32) -> u32 {
        (round_bf16(f64::from(f32::from_bits(bits))) as f32).to_bits()
    }

    /// The reference, worked differently: the two bfloat16 values around `x` (its truncation
    /// and the next one away from zero), compared by distance in f64; a tie goes to the one with
    /// an even last mantissa bit.
    fn nearest_bf16(x: f32) -> f64 {
        let toward_zero = x.to_bits() & 0xffff_0000;
        let away = toward_zero + 0x1_0000;
        let (low, high) = (f64::from(f32::from_bits(toward_zero)), f64::from(f32::from_bits(away)));
        let (d_low, d_high) = ((f64::from(x) - low).abs(), (high - f64::from(x)).abs());
        if d_low < d_high || (d_low == d_high && toward_zero & 0x1_0000 == 0) {
            low
        } else {
            high
        }
    }

    #[test]
    fn hand_worked_bit_patterns() {
        let cases: [(u32, u32); 16] = [
            (0x3f80_0000, 0x3f80_0000), // 1.0 is a bfloat16
            (0x3f80_7fff, 0x3f80_0000), // below the midpoint
            (0x3f80_8000, 0x3f80_0000), // midpoint 1 + 2⁻⁸, 0x3f80 is even: down
            (0x3f80_8001, 0x3f81_0000), // above the midpoint
            (0x3f81_8000, 0x3f82_0000), // midpoint, 0x3f81 is odd: up
            (0x3fff_8000, 0x4000_0000), // midpoint below 2.0, odd: carries into the exponent
            (0x4049_0fdb, 0x4049_0000), // π → 3.140625
            (0x7f7f_0000, 0x7f7f_0000), // the largest finite bfloat16
            (0x7f7f_7fff, 0x7f7f_0000),
            (0x7f7f_8000, 0x7f80_0000), // midpoint above the largest, odd: to infinity
            (0x7f7f_ffff, 0x7f80_0000), // the largest f32 overflows to infinity
            (0x7f80_0000, 0x7f80_0000), // infinity
            (0x0000_8000, 0x0000_0000), // subnormal midpoint, even: to zero
            (0x0001_8000, 0x0002_0000), // subnormal midpoint, odd: up
            (0x8000_0000, 0x8000_0000), // −0 keeps its sign
            (0xbf80_8001, 0xbf81_0000), // negative values round by magnitude
        ];
        for (input, expected) in cases {
            assert_eq!(round_f32_bits(input), expected, "{input:#010x}");
        }
    }

    /// The packed form holds the rounded value: back from its bits it is `round_bf16`'s.
    #[test]
    fn packed_bits_hold_the_rounded_value() {
        let mut rng = Rng::new(11);
        for _ in 0..10_000 {
            let x = (rng.gaussian() * 10f64.powi((rng.uniform() * 20.0) as i32 - 10)) as f32;
            assert_eq!(f64::from(from_bf16_bits(bf16_bits(x))), round_bf16(f64::from(x)), "{x}");
        }
        assert_eq!(bf16_bits(1.0), 0x3f80);
        assert_eq!(bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert!(from_bf16_bits(bf16_bits(f32::NAN)).is_nan());
    }

    #[test]
    fn nan_stays_nan_and_f64_overflow_goes_to_infinity() {
        assert!(round_bf16(f64::NAN).is_nan());
        assert_eq!(round_bf16(1e39), f64::INFINITY);
        assert_eq!(round_bf16(-1e300), f64::NEG_INFINITY);
        assert_eq!(round_bf16(1e-50), 0.0);
    }

    #[test]
    fn an_f64_is_rounded_to_f32_first() {
        // 1 + 2⁻⁸ + 2⁻³⁰ is above the bfloat16 midpoint 1 + 2⁻⁸, but f32 rounds it onto the
        // midpoint, which then goes to the even 1.0.
        assert_eq!(round_bf16(1.0 + 2f64.powi(-8) + 2f64.powi(-30)), 1.0);
        assert_eq!(round_bf16(1.0 + 2f64.powi(-8) + 2f64.powi(-20)), 1.0 + 2f64.powi(-7));
    }

    #[test]
    fn random_values_match_the_nearest_value_reference() {
        let mut rng = Rng::new(7);
        let mut checked = 0;
        while checked < 100_000 {
            let x = f32::from_bits(rng.next_u64() as u32);
            if x.is_nan() || x.abs() >= f32::from_bits(0x7f7f_8000) {
                continue; // NaN, and values that round to infinity, are covered above
            }
            assert_eq!(round_bf16(f64::from(x)), nearest_bf16(x), "{:#010x}", x.to_bits());
            checked += 1;
        }
        for _ in 0..10_000 {
            let x = rng.gaussian() * 10f64.powi((rng.uniform() * 20.0) as i32 - 10);
            assert_eq!(round_bf16(x), nearest_bf16(x as f32), "{x}");
        }
    }
}
