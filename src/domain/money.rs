//! Money: integer minor units inside, decimal strings at the edge.
//!
//! `Money` is an `i64` count of the currency's minor units (cents for EUR). Nothing in the service ever
//! holds money as a float. `Currency` knows how many decimal places the deployment's one currency has and
//! is the only place that turns strings into `Money` and back (through `rust_decimal`, never `f64`).

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// An amount in minor units. Arithmetic is checked: an overflow is a bug or an attack, never a wrap. The
/// count is private: `from_minor` makes one, `minor` reads it, and the operations below compute with it
/// (its serde encoding is the bare `i64`, unchanged).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Money(i64);

impl Money {
    pub const ZERO: Money = Money(0);

    /// `minor` minor units of the currency (cents for EUR).
    pub const fn from_minor(minor: i64) -> Money {
        Money(minor)
    }

    /// The amount in minor units.
    pub const fn minor(self) -> i64 {
        self.0
    }

    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.0.checked_add(other.0).map(Money)
    }

    pub fn checked_sub(self, other: Money) -> Option<Money> {
        self.0.checked_sub(other.0).map(Money)
    }

    pub fn checked_mul(self, factor: u32) -> Option<Money> {
        self.0.checked_mul(i64::from(factor)).map(Money)
    }

    /// `self - other`, at the bound of `i64` instead of wrapping. For views of stored rows only (a corrupt
    /// row then shows a saturated value, which the audit reports); `apply` uses the checked operations.
    pub fn saturating_sub(self, other: Money) -> Money {
        Money(self.0.saturating_sub(other.0))
    }

    /// `self × factor`, at the bound of `i64` instead of wrapping. For views of stored rows only, like
    /// `saturating_sub`.
    pub fn saturating_mul(self, factor: u32) -> Money {
        Money(self.0.saturating_mul(i64::from(factor)))
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    pub fn is_positive(self) -> bool {
        self.0 > 0
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} minor units", self.0)
    }
}

/// Why a money string was refused. Every variant maps to 422 `invalid_amount` at the edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("amount must be a decimal string such as \"12.50\"")]
    NotAString,
    #[error("\"{0}\" is not a decimal amount")]
    NotDecimal(String),
    #[error("\"{value}\" has more than {exponent} decimal places")]
    TooManyDecimals { value: String, exponent: u32 },
    #[error("amount must be greater than zero")]
    NotPositive,
    #[error("amount must not be negative")]
    Negative,
    #[error("amount must not exceed {max}")]
    TooLarge { max: String },
}

/// The deployment's one currency: its ISO code and its number of decimal places.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Currency {
    code: String,
    exponent: u32,
}

/// The largest amount accepted in one request: 1,000,000 whole units of the currency.
const MAX_WHOLE_UNITS_PER_AMOUNT: i64 = 1_000_000;
/// The largest balance a wallet may reach, in minor units (10^15: ten trillion EUR). Far above any real
/// wallet and far below `i64::MAX`, so no sum of balances and amounts can overflow. It does not depend on
/// the currency, so `apply` can enforce it without knowing the deployment's configuration.
pub const MAX_WALLET_BALANCE: Money = Money(1_000_000_000_000_000);

impl Currency {
    /// The longest currency exponent accepted (so `10^exponent` times the limits stays far inside `i64`).
    pub const MAX_EXPONENT: u32 = 4;

    pub fn new(code: &str, exponent: u32) -> Result<Currency, String> {
        let code = code.trim().to_ascii_uppercase();
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!("currency code must be three letters, got {code:?}"));
        }
        if exponent > Self::MAX_EXPONENT {
            return Err(format!(
                "currency exponent must be at most {}",
                Self::MAX_EXPONENT
            ));
        }
        Ok(Currency { code, exponent })
    }

    pub fn eur() -> Currency {
        Currency {
            code: "EUR".to_owned(),
            exponent: 2,
        }
    }

    pub fn code(&self) -> &str {
        &self.code
    }

    pub fn exponent(&self) -> u32 {
        self.exponent
    }

    fn minor_per_unit(&self) -> i64 {
        10_i64.pow(self.exponent)
    }

    /// The most one request may move (1,000,000.00 for EUR).
    pub fn max_amount(&self) -> Money {
        Money(MAX_WHOLE_UNITS_PER_AMOUNT * self.minor_per_unit())
    }

    /// Parses an amount that must be > 0 and ≤ `max_amount` (credits, top-ups, webhook amounts).
    pub fn parse_positive(&self, text: &str) -> Result<Money, AmountError> {
        let money = self.parse_non_negative(text)?;
        if money == Money::ZERO {
            return Err(AmountError::NotPositive);
        }
        Ok(money)
    }

    /// Parses an amount that must be ≥ 0 and ≤ `max_amount` (prices: a free item costs "0.00").
    pub fn parse_non_negative(&self, text: &str) -> Result<Money, AmountError> {
        let money = self.parse_any(text)?;
        if money.is_negative() {
            return Err(AmountError::Negative);
        }
        if money > self.max_amount() {
            return Err(AmountError::TooLarge {
                max: self.format(self.max_amount()),
            });
        }
        Ok(money)
    }

    /// Parses a decimal string of the plain form `-?digits(.digits)?` into minor units. No exponents, no
    /// spaces, no `+`, no more decimals than the currency has.
    fn parse_any(&self, text: &str) -> Result<Money, AmountError> {
        let not_decimal = || AmountError::NotDecimal(truncate_for_message(text));
        let unsigned = text.strip_prefix('-').unwrap_or(text);
        let (whole, fraction) = match unsigned.split_once('.') {
            Some((whole, fraction)) => (whole, Some(fraction)),
            None => (unsigned, None),
        };
        let digits_only = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits_only(whole) || fraction.is_some_and(|f| !digits_only(f)) || whole.len() > 15 {
            return Err(not_decimal());
        }
        if fraction.is_some_and(|f| f.len() > self.exponent as usize) {
            return Err(AmountError::TooManyDecimals {
                value: truncate_for_message(text),
                exponent: self.exponent,
            });
        }
        let decimal = Decimal::from_str(text).map_err(|_| not_decimal())?;
        let scaled = decimal
            .checked_mul(Decimal::from(self.minor_per_unit()))
            .ok_or_else(not_decimal)?;
        debug_assert!(
            scaled.fract().is_zero(),
            "decimal places were checked above"
        );
        let minor: i64 = scaled.trunc().try_into().map_err(|_| not_decimal())?;
        Ok(Money(minor))
    }

    /// Formats minor units as a decimal string with exactly `exponent` places: `Money(1250)` → `"12.50"`.
    pub fn format(&self, money: Money) -> String {
        Decimal::new(money.0, self.exponent).to_string()
    }
}

fn truncate_for_message(text: &str) -> String {
    text.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_eur() {
        let eur = Currency::eur();
        assert_eq!(eur.parse_positive("12.50"), Ok(Money(1250)));
        assert_eq!(eur.parse_positive("12.5"), Ok(Money(1250)));
        assert_eq!(eur.parse_positive("12"), Ok(Money(1200)));
        assert_eq!(eur.parse_positive("0.01"), Ok(Money(1)));
        assert_eq!(eur.parse_positive("1000000.00"), Ok(Money(100_000_000)));
        assert_eq!(eur.format(Money(1250)), "12.50");
        assert_eq!(eur.format(Money(0)), "0.00");
        assert_eq!(eur.format(Money(-5)), "-0.05");
        assert_eq!(eur.format(Money(100_000_000)), "1000000.00");
    }

    #[test]
    fn refuses_what_is_not_a_plain_positive_amount() {
        let eur = Currency::eur();
        for bad in [
            "", "abc", "1e3", "+1.00", " 1.00", "1.00 ", "1.", ".5", "1,00", "0x10", "NaN", "--1",
        ] {
            assert!(
                matches!(eur.parse_positive(bad), Err(AmountError::NotDecimal(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            eur.parse_positive("1.234"),
            Err(AmountError::TooManyDecimals { .. })
        ));
        assert_eq!(eur.parse_positive("0.00"), Err(AmountError::NotPositive));
        assert_eq!(eur.parse_positive("-1.00"), Err(AmountError::Negative));
        assert!(matches!(
            eur.parse_positive("1000000.01"),
            Err(AmountError::TooLarge { .. })
        ));
        assert!(matches!(
            eur.parse_positive("99999999999999999999"),
            Err(AmountError::NotDecimal(_))
        ));
        assert_eq!(eur.parse_non_negative("0.00"), Ok(Money(0)));
    }

    #[test]
    fn other_exponents() {
        let jpy = Currency::new("jpy", 0).expect("valid");
        assert_eq!(jpy.parse_positive("500"), Ok(Money(500)));
        assert!(jpy.parse_positive("5.0").is_err());
        assert_eq!(jpy.format(Money(500)), "500");
        assert!(Currency::new("EURO", 2).is_err());
        assert!(Currency::new("EUR", 9).is_err());
    }
}
