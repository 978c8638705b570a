//! Money: an integer amount in a currency's minor units. No floating point
//! anywhere: 10.50 EUR is 1050 EUR-cents, 1000 JPY is 1000, 1.500 BHD is 1500.

use std::fmt;

use crate::domain::FieldError;

/// An ISO 4217 currency that cards are charged in: an active code with a
/// minor-unit exponent (not a fund, precious metal or testing code).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency(iso_currency::Currency);

impl Currency {
    /// Parses an upper-case ISO 4217 alphabetic code.
    pub fn parse(code: &str) -> Result<Currency, FieldError> {
        if code.is_empty() {
            return Err(FieldError::new("currency", "is required"));
        }
        let unknown = || {
            FieldError::new(
                "currency",
                "must be an ISO 4217 currency code in upper case, e.g. EUR",
            )
        };
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(unknown());
        }
        let c = iso_currency::Currency::from_code(code).ok_or_else(unknown)?;
        if c.exponent().is_none() || c.is_fund() || c.is_special() || c.is_superseded().is_some() {
            return Err(unknown());
        }
        Ok(Currency(c))
    }

    pub fn code(self) -> &'static str {
        self.0.code()
    }

    /// Digits after the decimal point: 2 for EUR, 0 for JPY, 3 for BHD.
    pub fn exponent(self) -> u32 {
        self.0.exponent().map_or(0, u32::from)
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// An amount of money. Any sign: a request's amount is parsed as Money and
/// the decision then declines amounts that are not positive.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Money {
    amount_minor: i64,
    currency: Currency,
}

impl Money {
    pub fn new(amount_minor: i64, currency: Currency) -> Money {
        Money {
            amount_minor,
            currency,
        }
    }

    /// Parses the wire form (amount in minor units, currency code).
    pub fn parse(amount_minor: i64, currency: &str) -> Result<Money, FieldError> {
        Ok(Money::new(amount_minor, Currency::parse(currency)?))
    }

    /// Parses an amount that must be above zero, such as a limit.
    pub fn parse_positive(amount_minor: i64, currency: &str) -> Result<Money, FieldError> {
        let money = Money::parse(amount_minor, currency)?;
        if amount_minor <= 0 {
            return Err(FieldError::new("amount_minor", "must be greater than 0"));
        }
        Ok(money)
    }

    /// Parses what a person types: `50.00EUR`, `50 EUR`, `50EUR`, `1000JPY`,
    /// `1.500BHD`. At most the currency's number of decimals.
    pub fn parse_human(s: &str) -> Result<Money, FieldError> {
        let s = s.trim();
        let split = s.find(|c: char| c.is_ascii_alphabetic()).ok_or_else(|| {
            FieldError::new("", "must be an amount and a currency, e.g. 50.00EUR")
        })?;
        let (number, code) = (s[..split].trim(), s[split..].trim());
        let currency = Currency::parse(&code.to_ascii_uppercase())?;
        let exp = currency.exponent() as usize;
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        let digits_only = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty()
            || !digits_only(whole)
            || !digits_only(frac)
            || (number.contains('.') && frac.is_empty())
        {
            return Err(FieldError::new(
                "",
                "must be an amount and a currency, e.g. 50.00EUR",
            ));
        }
        if frac.len() > exp {
            return Err(FieldError::new(
                "",
                format!("{} has {exp} decimal places", currency.code()),
            ));
        }
        let scaled = format!("{whole}{frac:0<exp$}");
        let amount = scaled
            .parse::<i64>()
            .map_err(|_| FieldError::new("", "is too large"))?;
        Ok(Money::new(amount, currency))
    }

    pub fn amount_minor(self) -> i64 {
        self.amount_minor
    }

    pub fn currency(self) -> Currency {
        self.currency
    }

    pub fn is_positive(self) -> bool {
        self.amount_minor > 0
    }

    pub fn same_currency(self, other: Money) -> bool {
        self.currency == other.currency
    }

    /// `self + other`, or None on a currency mismatch or overflow.
    pub fn checked_add(self, other: Money) -> Option<Money> {
        if !self.same_currency(other) {
            return None;
        }
        Some(Money::new(
            self.amount_minor.checked_add(other.amount_minor)?,
            self.currency,
        ))
    }

    /// `self - other`, or None on a currency mismatch or overflow.
    pub fn checked_sub(self, other: Money) -> Option<Money> {
        if !self.same_currency(other) {
            return None;
        }
        Some(Money::new(
            self.amount_minor.checked_sub(other.amount_minor)?,
            self.currency,
        ))
    }
}

impl fmt::Display for Money {
    /// `10.50 EUR`, `1000 JPY`, `-1.500 BHD`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let exp = self.currency.exponent();
        let sign = if self.amount_minor < 0 { "-" } else { "" };
        let abs = self.amount_minor.unsigned_abs();
        if exp == 0 {
            return write!(f, "{sign}{abs} {}", self.currency);
        }
        let unit = 10u64.pow(exp);
        write!(
            f,
            "{sign}{}.{:0width$} {}",
            abs / unit,
            abs % unit,
            self.currency,
            width = exp as usize
        )
    }
}

impl fmt::Debug for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Money({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_active_currencies_with_their_exponent() {
        assert_eq!(Currency::parse("EUR").unwrap().exponent(), 2);
        assert_eq!(Currency::parse("JPY").unwrap().exponent(), 0);
        assert_eq!(Currency::parse("BHD").unwrap().exponent(), 3);
        assert_eq!(Currency::parse("USD").unwrap().code(), "USD");
    }

    #[test]
    fn rejects_unknown_lower_case_and_non_card_currencies() {
        for bad in [
            "", "eur", "EURO", "EU", "XYZ", "XAU", "XTS", "XXX", "USN", "E1R",
        ] {
            let err = Currency::parse(bad).unwrap_err();
            assert_eq!(err.field, "currency", "{bad}");
        }
    }

    #[test]
    fn positive_amounts_only_where_asked() {
        assert!(Money::parse(-5, "EUR").is_ok());
        assert_eq!(
            Money::parse_positive(0, "EUR").unwrap_err().field,
            "amount_minor"
        );
        assert_eq!(
            Money::parse_positive(-1, "EUR").unwrap_err().field,
            "amount_minor"
        );
        assert_eq!(Money::parse_positive(1, "EUR").unwrap().amount_minor(), 1);
    }

    #[test]
    fn arithmetic_refuses_mixed_currencies_and_overflow() {
        let eur = |n| Money::parse(n, "EUR").unwrap();
        let usd = Money::parse(1, "USD").unwrap();
        assert_eq!(eur(5).checked_add(eur(7)), Some(eur(12)));
        assert_eq!(eur(5).checked_sub(eur(7)), Some(eur(-2)));
        assert_eq!(eur(5).checked_add(usd), None);
        assert_eq!(eur(i64::MAX).checked_add(eur(1)), None);
        assert_eq!(eur(i64::MIN).checked_sub(eur(1)), None);
    }

    #[test]
    fn parses_what_people_type() {
        let p = |s| Money::parse_human(s).map(|m| m.to_string());
        assert_eq!(p("50.00EUR").unwrap(), "50.00 EUR");
        assert_eq!(p("50 eur").unwrap(), "50.00 EUR");
        assert_eq!(p("0.5EUR").unwrap(), "0.50 EUR");
        assert_eq!(p("1000JPY").unwrap(), "1000 JPY");
        assert_eq!(p("1.5BHD").unwrap(), "1.500 BHD");
        assert_eq!(
            Money::parse_human("12.34 USD").unwrap().amount_minor(),
            1234
        );
        for bad in [
            "",
            "EUR",
            "50",
            "1.001EUR",
            "10.5JPY",
            "-5EUR",
            "5.EUR",
            "1e3EUR",
            "99999999999999999999EUR",
            "5XYZ",
        ] {
            assert!(Money::parse_human(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn displays_with_the_currency_exponent() {
        assert_eq!(Money::parse(1050, "EUR").unwrap().to_string(), "10.50 EUR");
        assert_eq!(Money::parse(5, "EUR").unwrap().to_string(), "0.05 EUR");
        assert_eq!(Money::parse(1000, "JPY").unwrap().to_string(), "1000 JPY");
        assert_eq!(
            Money::parse(-1500, "BHD").unwrap().to_string(),
            "-1.500 BHD"
        );
        assert_eq!(
            Money::parse(i64::MIN, "EUR").unwrap().to_string(),
            "-92233720368547758.08 EUR"
        );
    }
}
