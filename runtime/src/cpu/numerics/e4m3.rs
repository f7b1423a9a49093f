//! FP8 E4M3 as OCP's E4M3FN defines it and NVIDIA (`__nv_fp8_e4m3`) and PyTorch
//! (`float8_e4m3fn`) store it: 1 sign bit, 4 exponent bits with bias 7, 3 mantissa bits. There
//! are no infinities; S.1111.111 is NaN, so the largest finite magnitude is 1.110₂ × 2⁸ = 448.
//! Exponent field 0 holds the subnormals m/8 × 2⁻⁶, down to 2⁻⁹. Encoding rounds to nearest,
//! ties to even, and saturates like PTX `cvt.rn.satfinite.e4m3x2.f32`: every magnitude ≥ 448,
//! infinities included, becomes ±448. NaN encodes as the NaN code with the input's sign bit
//! (0x7f or 0xff, as PyTorch's conversion does), so all 256 codes survive decode → encode.

/// The largest finite E4M3 magnitude, S.1111.110.
pub const E4M3_MAX: f64 = 448.0;

/// The sign bit of a code.
const SIGN_BIT: u8 = 0x80;
/// The magnitude bits of NaN, .1111.111.
const NAN_MAGNITUDE: u8 = 0x7f;
/// The magnitude bits of 448, .1111.110.
const MAX_MAGNITUDE: u8 = 0x7e;
/// The exponent bias.
const BIAS: i32 = 7;
/// The number of mantissa bits.
const MANTISSA_BITS: i32 = 3;
/// The unbiased exponent of the smallest normal binade, 2⁻⁶; the subnormals share its spacing.
const MIN_EXPONENT: i32 = 1 - BIAS;

/// The value of an E4M3 code; NaN (with the code's sign) for 0x7f and 0xff.
pub fn e4m3_decode(code: u8) -> f64 {
    let magnitude = code & !SIGN_BIT;
    let value = if magnitude == NAN_MAGNITUDE { f64::NAN } else { decode_magnitude(magnitude) };
    if code & SIGN_BIT == 0 {
        value
    } else {
        -value
    }
}

/// The E4M3 code nearest `x`: round to nearest, ties to even; finite values beyond ±448 and
/// ±infinity saturate to ±448; the sign of zero and of NaN is kept.
pub fn e4m3_encode(x: f64) -> u8 {
    let sign = if x.is_sign_negative() { SIGN_BIT } else { 0 };
    sign | encode_magnitude(x.abs())
}

/// `x` rounded to the nearest E4M3 value (with saturation): `e4m3_decode(e4m3_encode(x))`,
/// below 448 in magnitude computed without the code: in `x`'s binade (clamped below to the
/// subnormals') the magnitude is scaled to steps of 2^(e−3) (exactly: a power of two), rounded
/// to a whole number of steps, ties to even (adding and taking away 2⁵² does that exactly for
/// the 0 to 16 steps a binade has), and scaled back; the sign is `x`'s, zero's included.
pub fn round_e4m3(x: f64) -> f64 {
    const WHOLE: f64 = 4_503_599_627_370_496.0; // 2⁵²: the f64s from here on are whole numbers
    let a = x.abs();
    if a.is_nan() || a >= E4M3_MAX {
        return e4m3_decode(e4m3_encode(x)); // NaN, or saturated
    }
    let exponent = binary_exponent(a).max(MIN_EXPONENT);
    let steps = (a * pow2(MANTISSA_BITS - exponent) + WHOLE) - WHOLE;
    (steps * pow2(exponent - MANTISSA_BITS)).copysign(x)
}

/// The value of a non-NaN magnitude code: (8 + m) × 2^(e − 7 − 3) for exponent field e ≥ 1,
/// m × 2^(1 − 7 − 3) for the subnormals (e = 0).
fn decode_magnitude(magnitude: u8) -> f64 {
    let exponent_field = i32::from(magnitude >> MANTISSA_BITS);
    let mantissa = f64::from(magnitude & 0b111);
    if exponent_field == 0 {
        mantissa * pow2(MIN_EXPONENT - MANTISSA_BITS)
    } else {
        (8.0 + mantissa) * pow2(exponent_field - BIAS - MANTISSA_BITS)
    }
}

/// The magnitude code nearest a non-negative `a` (or NaN). In the binade 2^e ≤ a < 2^(e+1)
/// (e clamped below to −6 for the subnormals) the values are steps × 2^(e−3); `a` is rounded to
/// a whole number of steps (in 0..=16; 16 carries into the next binade) and the code is
/// (e + 6) × 8 + steps, which is exponent field × 8 + mantissa for normals and the mantissa for
/// subnormals.
fn encode_magnitude(a: f64) -> u8 {
    if a.is_nan() {
        return NAN_MAGNITUDE;
    }
    if a >= E4M3_MAX {
        return MAX_MAGNITUDE;
    }
    let exponent = binary_exponent(a).max(MIN_EXPONENT);
    let steps = (a / pow2(exponent - MANTISSA_BITS)).round_ties_even() as i32;
    let code = (exponent - MIN_EXPONENT) * 8 + steps;
    u8::try_from(code).expect("a magnitude below 448 has a code below 0x7f")
}

/// ⌊log₂ a⌋ for a normal positive `a`; −1023 for zero and subnormal `a`, which only needs to be
/// below −6.
fn binary_exponent(a: f64) -> i32 {
    let biased = (a.to_bits() >> 52) & 0x7ff;
    i32::try_from(biased).expect("11 bits") - 1023
}

/// 2^e, exactly, for −1022 ≤ e ≤ 1023.
fn pow2(e: i32) -> f64 {
    let biased = u64::try_from(e + 1023).expect("exponent within f64's normal range");
    f64::from_bits(biased << 52)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A code's value by the format's definition, written independently of the decoder:
    /// sign × 2^(e−7) × (1 + m/8) for normals, sign × 2^−6 × m/8 for subnormals.
    fn definition(code: u8) -> f64 {
        let sign = if code >= 0x80 { -1.0 } else { 1.0 };
        let e = i32::from((code >> 3) & 0xf);
        let m = f64::from(code & 7);
        if e == 0 {
            sign * 2f64.powi(-6) * (m / 8.0)
        } else {
            sign * 2f64.powi(e - 7) * (1.0 + m / 8.0)
        }
    }

    fn is_nan_code(code: u8) -> bool {
        code & 0x7f == 0x7f
    }

    /// The non-negative finite values in code order 0x00..=0x7e (increasing).
    fn positive_values() -> Vec<f64> {
        (0..=0x7e).map(definition).collect()
    }

    /// The nearest-value reference: the code of the value closest to `a ≥ 0`, ties to the even
    /// code, by searching the table of values; beyond 448, 0x7e.
    fn nearest_code(values: &[f64], a: f64) -> u8 {
        let above = values.partition_point(|&v| v < a);
        let code = if above == values.len() {
            values.len() - 1
        } else if values[above] == a || above == 0 {
            above
        } else {
            let below = above - 1;
            let (down, up) = (a - values[below], values[above] - a);
            if down < up || (down == up && below % 2 == 0) {
                below
            } else {
                above
            }
        };
        u8::try_from(code).unwrap()
    }

    #[test]
    fn rounding_agrees_with_the_codes_bit_for_bit() {
        // Every 1009th f32 (all binades, both signs, NaNs and infinities), and halfway points.
        let f32s = (0..=u32::MAX).step_by(1009).map(|bits| f64::from(f32::from_bits(bits)));
        let halfway = (0..=0xfeu8).map(|code| (e4m3_decode(code) + e4m3_decode(code + 1)) / 2.0);
        for x in f32s.chain(halfway).chain([0.0, -0.0, 448.0, 464.0, -464.0, 2f64.powi(-10), 2f64.powi(-9)]) {
            assert_eq!(round_e4m3(x).to_bits(), e4m3_decode(e4m3_encode(x)).to_bits(), "{x:e}");
        }
    }

    #[test]
    fn every_finite_code_decodes_to_its_definition() {
        for code in (0..=255u8).filter(|&code| !is_nan_code(code)) {
            let value = e4m3_decode(code);
            assert_eq!(value, definition(code), "code {code:#04x}");
            assert_eq!(value.is_sign_negative(), code >= 0x80, "sign of {code:#04x}");
        }
        assert_eq!(e4m3_decode(0x7e), 448.0);
        assert_eq!(e4m3_decode(0xfe), -448.0);
        assert_eq!(e4m3_decode(0x01), 2f64.powi(-9));
        assert_eq!(e4m3_decode(0x08), 2f64.powi(-6));
        assert_eq!(e4m3_decode(0x38), 1.0);
        assert_eq!(e4m3_decode(0x80).to_bits(), (-0.0f64).to_bits());
    }

    #[test]
    fn nan_codes_decode_to_nan_with_their_sign() {
        assert!(e4m3_decode(0x7f).is_nan() && e4m3_decode(0x7f).is_sign_positive());
        assert!(e4m3_decode(0xff).is_nan() && e4m3_decode(0xff).is_sign_negative());
        assert_eq!(e4m3_encode(f64::NAN), 0x7f);
        assert_eq!(e4m3_encode(-f64::NAN), 0xff);
        assert!(round_e4m3(f64::NAN).is_nan());
    }

    #[test]
    fn every_code_round_trips() {
        for code in 0..=255u8 {
            assert_eq!(e4m3_encode(e4m3_decode(code)), code, "code {code:#04x}");
        }
    }

    #[test]
    fn midpoints_round_to_the_even_code_and_their_neighbours_to_the_nearer_value() {
        let values = positive_values();
        for low in 0..values.len() - 1 {
            let (code_low, code_high) = (u8::try_from(low).unwrap(), u8::try_from(low + 1).unwrap());
            let even = if low % 2 == 0 { code_low } else { code_high };
            let midpoint = (values[low] + values[low + 1]) / 2.0;
            assert_eq!(e4m3_encode(midpoint), even, "midpoint {midpoint}");
            assert_eq!(e4m3_encode(-midpoint), even | 0x80, "midpoint {}", -midpoint);
            assert_eq!(e4m3_encode(midpoint.next_down()), code_low, "below {midpoint}");
            assert_eq!(e4m3_encode(midpoint.next_up()), code_high, "above {midpoint}");
            assert_eq!(e4m3_encode(-midpoint.next_up()), code_high | 0x80, "below {}", -midpoint);
        }
        // Spot checks by hand: 1.0625 lies between 1 (mantissa 000) and 1.125 (001); 1.1875
        // between 1.125 (001) and 1.25 (010).
        assert_eq!(round_e4m3(1.0625), 1.0);
        assert_eq!(round_e4m3(1.1875), 1.25);
        assert_eq!(round_e4m3(1.07), 1.125);
    }

    #[test]
    fn out_of_range_values_saturate_to_448() {
        for x in [448.0f64.next_up(), 463.0, 464.0, 465.0, 479.99, 480.0, 1e6, 1e300, f64::MAX, f64::INFINITY] {
            assert_eq!(e4m3_encode(x), 0x7e, "{x}");
            assert_eq!(e4m3_encode(-x), 0xfe, "{}", -x);
            assert_eq!(round_e4m3(x), 448.0);
        }
        // Just below 448 still rounds normally: 432 is the midpoint of 416 (odd 101) and 448 (110).
        assert_eq!(round_e4m3(432.0), 448.0);
        assert_eq!(round_e4m3(431.9), 416.0);
    }

    #[test]
    fn tiny_values_flush_to_signed_zero() {
        let half_min = 2f64.powi(-10);
        for x in [half_min, half_min.next_down(), 1e-30, f64::from_bits(1), 0.0] {
            assert_eq!(e4m3_encode(x), 0x00, "{x}");
            assert_eq!(e4m3_encode(-x), 0x80, "{}", -x);
        }
        assert_eq!(e4m3_encode(half_min.next_up()), 0x01);
        assert_eq!(round_e4m3(-0.0).to_bits(), (-0.0f64).to_bits());
        // The largest subnormal, 7/8 × 2⁻⁶, and the carry from subnormal into the first binade.
        assert_eq!(e4m3_encode(7.0 / 8.0 * 2f64.powi(-6)), 0x07);
        assert_eq!(e4m3_encode(15.0 / 16.0 * 2f64.powi(-6)), 0x08);
    }

    /// Every 997th positive f32 bit pattern up to 500 (about 1.1 million values from the f32
    /// subnormals to beyond 448), both signs: encode agrees with the nearest-value reference and
    /// the rounded value never decreases as x grows.
    #[test]
    fn dense_sweep_is_nearest_and_monotone() {
        let values = positive_values();
        let end = 500f32.to_bits();
        let mut previous = 0.0;
        for bits in (0..end).step_by(997) {
            let x = f64::from(f32::from_bits(bits));
            let code = e4m3_encode(x);
            assert_eq!(code, nearest_code(&values, x), "{x}");
            assert_eq!(e4m3_encode(-x), code | 0x80, "{}", -x);
            let rounded = e4m3_decode(code);
            assert!(rounded >= previous, "round_e4m3 decreases at {x}: {rounded} < {previous}");
            previous = rounded;
        }
        assert_eq!(previous, 448.0);
    }
}
