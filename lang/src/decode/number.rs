//! Exact decimal numbers as written in a spec: `129_280`, `2.2e-4`, `14.8T` (×10¹²),
//! `4Ki` (×1024). Whole numbers are decoded without passing through floating point, so
//! `14.8T` is exactly 14,800,000,000,000.

/// `mantissa × 10^-scale`, with the sign apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decimal {
    negative: bool,
    mantissa: u128,
    scale: u32,
}

const TOO_LARGE: &str = "number is too large";

impl Decimal {
    /// Parses a literal accepted by the grammar's `literal` rule.
    pub fn parse(literal: &str) -> Result<Decimal, String> {
        let text: String = literal.chars().filter(|c| *c != '_').collect();
        let (negative, text) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text.as_str()),
        };
        let (body, multiplier): (&str, u128) = [
            ("Ki", 1 << 10),
            ("Mi", 1 << 20),
            ("K", 1_000),
            ("M", 1_000_000),
            ("B", 1_000_000_000),
            ("T", 1_000_000_000_000),
        ]
        .iter()
        .find_map(|(s, m)| text.strip_suffix(s).map(|b| (b, *m)))
        .unwrap_or((text, 1));
        let (digits, exponent) = match body.find(['e', 'E']) {
            Some(i) => {
                let exp: i64 = body[i + 1..].parse().map_err(|_| TOO_LARGE.to_string())?;
                (&body[..i], exp)
            }
            None => (body, 0),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        let mut mantissa: u128 = 0;
        for c in int.chars().chain(frac.chars()) {
            let digit = c.to_digit(10).ok_or_else(|| format!("`{literal}` is not a number"))?;
            mantissa = mantissa
                .checked_mul(10)
                .and_then(|m| m.checked_add(digit as u128))
                .ok_or_else(|| TOO_LARGE.to_string())?;
        }
        let mut scale = frac.len() as i64 - exponent;
        while scale < 0 {
            mantissa = mantissa.checked_mul(10).ok_or_else(|| TOO_LARGE.to_string())?;
            scale += 1;
        }
        let scale = u32::try_from(scale).map_err(|_| "number is too small".to_string())?;
        Decimal { negative, mantissa, scale }.times_u128(multiplier)
    }

    fn times_u128(self, factor: u128) -> Result<Decimal, String> {
        let mantissa = self.mantissa.checked_mul(factor).ok_or_else(|| TOO_LARGE.to_string())?;
        Ok(Decimal { mantissa, ..self })
    }

    pub fn times(self, factor: u64) -> Result<Decimal, String> {
        self.times_u128(factor as u128)
    }

    /// The exact whole number, or why it is not one.
    pub fn to_u64(self) -> Result<u64, String> {
        if self.negative && self.mantissa != 0 {
            return Err("expected a number ≥ 0, found a negative one".into());
        }
        let whole = match 10u128.checked_pow(self.scale) {
            Some(p) if self.mantissa.is_multiple_of(p) => self.mantissa / p,
            _ if self.mantissa == 0 => 0,
            _ => return Err("expected a whole number".into()),
        };
        u64::try_from(whole).map_err(|_| format!("{TOO_LARGE} (the limit is {})", u64::MAX))
    }

    /// The nearest `f64` (correctly rounded by the standard library's parser).
    pub fn to_f64(self) -> f64 {
        let sign = if self.negative { "-" } else { "" };
        format!("{sign}{}e-{}", self.mantissa, self.scale).parse().unwrap_or(f64::INFINITY)
    }
}

#[cfg(test)]
mod tests {
    use super::Decimal;

    fn whole(s: &str) -> Result<u64, String> {
        Decimal::parse(s)?.to_u64()
    }

    #[test]
    fn suffixes_and_exponents_are_exact() {
        assert_eq!(whole("14.8T"), Ok(14_800_000_000_000));
        assert_eq!(whole("469B"), Ok(469_000_000_000));
        assert_eq!(whole("4Ki"), Ok(4096));
        assert_eq!(whole("128Ki"), Ok(131_072));
        assert_eq!(whole("2K"), Ok(2000));
        assert_eq!(whole("1.5Ki"), Ok(1536));
        assert_eq!(whole("129_280"), Ok(129_280));
        assert_eq!(whole("1e3"), Ok(1000));
        assert_eq!(whole("2.5e1"), Ok(25));
        assert_eq!(Decimal::parse("2.2e-4").unwrap().to_f64(), 2.2e-4);
        assert_eq!(Decimal::parse("1e-6").unwrap().to_f64(), 1e-6);
        assert_eq!(Decimal::parse("-0.5").unwrap().to_f64(), -0.5);
    }

    #[test]
    fn bad_numbers_are_errors_not_panics() {
        assert!(whole("2.5").unwrap_err().contains("whole"));
        assert!(whole("18446744073709551616").unwrap_err().contains("too large"));
        assert_eq!(whole("18446744073709551615"), Ok(u64::MAX));
        assert!(whole("99999999999999999999999999999999999999999").is_err());
        assert!(whole("1e99999999999999999999").is_err());
        assert!(whole("1e40").is_err());
        assert!(whole("-3").unwrap_err().contains("negative"));
        assert!(Decimal::parse("1e-99999").is_ok());
    }
}
