//! The authorisation decision: one attempt against one card, in a fixed
//! order, first failure wins.
//!
//! The order, and why:
//! 1. `14` unknown number or bad Luhn: decided before a card is found (the
//!    vault answers it; there is no card to run this function on).
//! 2. `05` closed, `65` used, `62` paused or blocked: a card that cannot pay
//!    says so before any credential is checked, so a blocked card stops
//!    counting guesses.
//! 3. `54` expiry month/year not the card's, then `N7` wrong CVV: proof of
//!    possession. Each failure counts; the configured number in a row blocks
//!    the card.
//! 4. `54` past `valid_until`.
//! 5. `13` amount not positive or in another currency.
//! 6. `57` merchant or MCC not allowed.
//! 7. `61` over the per-transaction limit, then `51` over what remains.
//!
//! A decline consumes neither a use nor any of the cap. An approval debits
//! the cap, takes a use, clears the failure count and may lock the merchant.
//! `94` (a transaction id seen before with other content) is decided before
//! all of this by the vault, which keeps the transaction log.

use time::OffsetDateTime;

use crate::domain::{Card, CardState, Expiry, Mcc, MerchantId, Money};

/// ISO 8583 field 39 codes this service answers, with a readable word each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResponseCode {
    Approved,
    UnknownCard,
    Closed,
    Used,
    Paused,
    Blocked,
    WrongExpiry,
    WrongCvv,
    Expired,
    InvalidAmount,
    WrongCurrency,
    MerchantNotAllowed,
    MccNotAllowed,
    OverTransactionLimit,
    InsufficientFunds,
    DuplicateTransaction,
}

impl ResponseCode {
    pub const ALL: [ResponseCode; 16] = [
        ResponseCode::Approved,
        ResponseCode::UnknownCard,
        ResponseCode::Closed,
        ResponseCode::Used,
        ResponseCode::Paused,
        ResponseCode::Blocked,
        ResponseCode::WrongExpiry,
        ResponseCode::WrongCvv,
        ResponseCode::Expired,
        ResponseCode::InvalidAmount,
        ResponseCode::WrongCurrency,
        ResponseCode::MerchantNotAllowed,
        ResponseCode::MccNotAllowed,
        ResponseCode::OverTransactionLimit,
        ResponseCode::InsufficientFunds,
        ResponseCode::DuplicateTransaction,
    ];

    /// The two-character ISO 8583 response code.
    pub fn code(self) -> &'static str {
        use ResponseCode::*;
        match self {
            Approved => "00",
            UnknownCard => "14",
            Closed => "05",
            Used => "65",
            Paused | Blocked => "62",
            WrongExpiry | Expired => "54",
            WrongCvv => "N7",
            InvalidAmount | WrongCurrency => "13",
            MerchantNotAllowed | MccNotAllowed => "57",
            OverTransactionLimit => "61",
            InsufficientFunds => "51",
            DuplicateTransaction => "94",
        }
    }

    /// One readable word (snake_case) for logs and the response.
    pub fn reason(self) -> &'static str {
        use ResponseCode::*;
        match self {
            Approved => "approved",
            UnknownCard => "unknown_card",
            Closed => "card_closed",
            Used => "card_used",
            Paused => "card_paused",
            Blocked => "card_blocked",
            WrongExpiry => "wrong_expiry",
            WrongCvv => "wrong_cvv",
            Expired => "card_expired",
            InvalidAmount => "invalid_amount",
            WrongCurrency => "wrong_currency",
            MerchantNotAllowed => "merchant_not_allowed",
            MccNotAllowed => "mcc_not_allowed",
            OverTransactionLimit => "over_transaction_limit",
            InsufficientFunds => "insufficient_funds",
            DuplicateTransaction => "duplicate_transaction",
        }
    }

    /// The inverse of [`reason`](Self::reason), for stored answers.
    pub fn from_reason(reason: &str) -> Option<ResponseCode> {
        Self::ALL.into_iter().find(|c| c.reason() == reason)
    }

    pub fn is_approved(self) -> bool {
        self == ResponseCode::Approved
    }
}

/// One authorisation attempt, parsed, with the CVV already checked by the
/// vault (which holds the key it is derived with).
#[derive(Debug, Clone)]
pub struct Attempt<'a> {
    pub expiry: Expiry,
    pub cvv_ok: bool,
    pub amount: Money,
    pub merchant_id: Option<&'a MerchantId>,
    pub mcc: Option<Mcc>,
}

/// What was decided. The card has been updated to match.
pub type Decision = ResponseCode;

/// Decides `attempt` on `card` at `now` and applies the outcome to the
/// card. `max_failed_verifications` wrong expiries or CVVs in a row block it.
pub fn authorize(
    card: &mut Card,
    attempt: &Attempt<'_>,
    now: OffsetDateTime,
    max_failed_verifications: u32,
) -> Decision {
    use ResponseCode::*;
    let state = match card.state {
        CardState::Closed => Some(Closed),
        CardState::Used => Some(Used),
        CardState::Paused => Some(Paused),
        CardState::Blocked => Some(Blocked),
        CardState::Active => None,
    };
    if let Some(code) = state {
        return code;
    }

    let credential = if attempt.expiry != card.expiry {
        Some(WrongExpiry)
    } else if !attempt.cvv_ok {
        Some(WrongCvv)
    } else {
        None
    };
    if let Some(code) = credential {
        card.failed_verifications = card.failed_verifications.saturating_add(1);
        if card.failed_verifications >= max_failed_verifications.max(1) {
            card.state = CardState::Blocked;
        }
        return code;
    }

    if now > card.policy.valid_until {
        return Expired;
    }
    if !attempt.amount.is_positive() {
        return InvalidAmount;
    }
    if !attempt.amount.same_currency(card.policy.spend_limit) {
        return WrongCurrency;
    }

    let merchant_ok = match (&card.policy.merchant_id, attempt.merchant_id) {
        (Some(locked), Some(m)) => locked == m,
        (Some(_), None) => false,
        (None, m) => !card.policy.lock_to_first_merchant || m.is_some(),
    };
    if !merchant_ok {
        return MerchantNotAllowed;
    }
    let policy = &card.policy;
    let mcc_ok = match attempt.mcc {
        Some(mcc) => {
            (policy.allowed_mccs.is_empty() || policy.allowed_mccs.contains(&mcc))
                && !policy.blocked_mccs.contains(&mcc)
        }
        // A category that is not known cannot be shown to pass a list.
        None => policy.allowed_mccs.is_empty() && policy.blocked_mccs.is_empty(),
    };
    if !mcc_ok {
        return MccNotAllowed;
    }

    if let Some(limit) = policy.per_transaction_limit {
        if attempt.amount.amount_minor() > limit.amount_minor() {
            return OverTransactionLimit;
        }
    }
    if attempt.amount.amount_minor() > card.remaining().amount_minor() {
        return InsufficientFunds;
    }

    // Approved: debit, take a use, clear failures, lock the merchant.
    card.spent = Money::new(
        card.spent.amount_minor() + attempt.amount.amount_minor(),
        card.spent.currency(),
    );
    card.uses += 1;
    card.failed_verifications = 0;
    if card.policy.lock_to_first_merchant && card.policy.merchant_id.is_none() {
        card.policy.merchant_id = attempt.merchant_id.cloned();
    }
    if card.uses >= card.policy.max_uses {
        card.state = CardState::Used;
    }
    Approved
}

/// Gives `amount` back to the card's cap (a reversal). Uses are not given
/// back. The caller guarantees `amount` is at most what the reversed
/// authorisation approved and has not yet been reversed.
pub fn reverse(card: &mut Card, amount: Money) {
    let spent = card
        .spent
        .amount_minor()
        .saturating_sub(amount.amount_minor())
        .max(0);
    card.spent = Money::new(spent, card.spent.currency());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::card::tests::{bounds, card, eur, input, NOW};
    use crate::domain::card::PolicyInput;
    use crate::domain::CardPolicy;
    use ResponseCode::*;

    fn new_card(i: PolicyInput) -> Card {
        card(CardPolicy::new(i, NOW, bounds()).unwrap())
    }

    fn good(c: &Card, amount: Money) -> Attempt<'static> {
        Attempt {
            expiry: c.expiry,
            cvv_ok: true,
            amount,
            merchant_id: None,
            mcc: Some(Mcc::parse("5411").unwrap()),
        }
    }

    fn run(c: &mut Card, a: &Attempt<'_>) -> ResponseCode {
        authorize(c, a, NOW, 3)
    }

    /// A good attempt for `amount` at no merchant.
    fn pay(c: &mut Card, amount: Money) -> ResponseCode {
        let a = good(c, amount);
        run(c, &a)
    }

    /// A good attempt for 10 EUR at `merchant`.
    fn pay_at(c: &mut Card, merchant: Option<&MerchantId>) -> ResponseCode {
        let a = Attempt {
            merchant_id: merchant,
            ..good(c, eur(10))
        };
        run(c, &a)
    }

    #[test]
    fn codes_are_the_iso_8583_ones_and_reasons_round_trip() {
        let codes: Vec<_> = ResponseCode::ALL.iter().map(|c| c.code()).collect();
        for want in [
            "00", "14", "54", "N7", "62", "05", "65", "13", "57", "61", "51", "94",
        ] {
            assert!(codes.contains(&want), "{want}");
        }
        for c in ResponseCode::ALL {
            assert_eq!(ResponseCode::from_reason(c.reason()), Some(c));
        }
        assert_eq!(ResponseCode::from_reason("nope"), None);
    }

    #[test]
    fn approval_debits_takes_a_use_and_single_use_becomes_used() {
        let mut c = new_card(input());
        let a = good(&c, eur(1200));
        assert_eq!(run(&mut c, &a), Approved);
        assert_eq!(c.spent, eur(1200));
        assert_eq!(c.remaining(), eur(3800));
        assert_eq!(c.uses, 1);
        assert_eq!(c.state, CardState::Used);
        assert_eq!(run(&mut c, &a), Used);
        assert_eq!(c.spent, eur(1200), "a decline must not debit");
    }

    #[test]
    fn multi_use_card_spends_down_to_its_cap() {
        let mut c = new_card(PolicyInput {
            max_uses: 3,
            ..input()
        });
        assert_eq!(pay(&mut c, eur(2000)), Approved);
        assert_eq!(pay(&mut c, eur(3001)), InsufficientFunds);
        assert_eq!(pay(&mut c, eur(3000)), Approved);
        assert_eq!(c.remaining(), eur(0));
        assert_eq!(c.state, CardState::Active);
        assert_eq!(pay(&mut c, eur(1)), InsufficientFunds);
        assert_eq!(c.uses, 2);
    }

    #[test]
    fn each_decline_and_its_code() {
        let base = new_card(PolicyInput {
            max_uses: 5,
            per_transaction_limit: Some(eur(1000)),
            allowed_mccs: vec![Mcc::parse("5411").unwrap(), Mcc::parse("5999").unwrap()],
            blocked_mccs: vec![Mcc::parse("5999").unwrap()],
            ..input()
        });
        let check = |mutate: &dyn Fn(&mut Card, &mut Attempt<'static>), want: ResponseCode| {
            let mut c = base.clone();
            let mut a = good(&c, eur(500));
            mutate(&mut c, &mut a);
            let before = (c.spent, c.uses);
            assert_eq!(run(&mut c, &a), want);
            assert_eq!((c.spent, c.uses), before, "{want:?} must not debit");
            assert_eq!(want.code().len(), 2);
        };
        check(&|c, _| c.state = CardState::Closed, Closed);
        check(&|c, _| c.state = CardState::Used, Used);
        check(&|c, _| c.state = CardState::Paused, Paused);
        check(&|c, _| c.state = CardState::Blocked, Blocked);
        check(
            &|_, a| a.expiry.month = a.expiry.month % 12 + 1,
            WrongExpiry,
        );
        check(&|_, a| a.expiry.year += 1, WrongExpiry);
        check(&|_, a| a.cvv_ok = false, WrongCvv);
        check(
            &|c, _| c.policy.valid_until = NOW - time::Duration::seconds(1),
            Expired,
        );
        check(&|_, a| a.amount = eur(0), InvalidAmount);
        check(&|_, a| a.amount = eur(-5), InvalidAmount);
        check(
            &|_, a| a.amount = Money::parse(500, "USD").unwrap(),
            WrongCurrency,
        );
        check(
            &|_, a| a.mcc = Some(Mcc::parse("7995").unwrap()),
            MccNotAllowed,
        );
        check(
            &|_, a| a.mcc = Some(Mcc::parse("5999").unwrap()),
            MccNotAllowed,
        );
        check(&|_, a| a.mcc = None, MccNotAllowed);
        check(&|_, a| a.amount = eur(1001), OverTransactionLimit);
        check(&|c, _| c.spent = eur(4800), InsufficientFunds);
    }

    #[test]
    fn first_failure_wins_in_the_documented_order() {
        // Everything wrong at once: each fix reveals the next code in order.
        let mut c = new_card(PolicyInput {
            max_uses: 5,
            per_transaction_limit: Some(eur(100)),
            merchant_id: Some(MerchantId::parse("m", "shop-1").unwrap()),
            ..input()
        });
        c.spent = eur(4950);
        c.state = CardState::Closed;
        c.policy.valid_until = NOW - time::Duration::seconds(1);
        let mut a = Attempt {
            expiry: Expiry {
                month: 1,
                year: 2001,
            },
            cvv_ok: false,
            amount: eur(0),
            merchant_id: None,
            mcc: None,
        };
        type Fix = Box<dyn Fn(&mut Card, &mut Attempt<'static>)>;
        let steps: Vec<(ResponseCode, Fix)> = vec![
            (Closed, Box::new(|c, _| c.state = CardState::Used)),
            (Used, Box::new(|c, _| c.state = CardState::Paused)),
            (Paused, Box::new(|c, _| c.state = CardState::Active)),
            (WrongExpiry, Box::new(|c, a| a.expiry = c.expiry)),
            (WrongCvv, Box::new(|_, a| a.cvv_ok = true)),
            (
                Expired,
                Box::new(|c, _| c.policy.valid_until = NOW + time::Duration::days(1)),
            ),
            (
                InvalidAmount,
                Box::new(|_, a| a.amount = Money::parse(500, "USD").unwrap()),
            ),
            (WrongCurrency, Box::new(|_, a| a.amount = eur(500))),
            (
                MerchantNotAllowed,
                Box::new(|c, _| c.policy.merchant_id = None),
            ),
            (OverTransactionLimit, Box::new(|_, a| a.amount = eur(60))),
            (InsufficientFunds, Box::new(|_, a| a.amount = eur(50))),
        ];
        for (want, fix) in steps {
            c.failed_verifications = 0;
            assert_eq!(run(&mut c, &a), want);
            fix(&mut c, &mut a);
        }
        assert_eq!(run(&mut c, &a), Approved);
    }

    #[test]
    fn three_bad_credentials_in_a_row_block_and_an_approval_resets() {
        let mut c = new_card(PolicyInput {
            max_uses: 10,
            ..input()
        });
        let ok = good(&c, eur(10));
        let bad_cvv = Attempt {
            cvv_ok: false,
            ..ok.clone()
        };
        let bad_exp = Attempt {
            expiry: Expiry {
                month: 1,
                year: 2001,
            },
            ..ok.clone()
        };
        assert_eq!(run(&mut c, &bad_cvv), WrongCvv);
        assert_eq!(run(&mut c, &bad_exp), WrongExpiry);
        assert_eq!(run(&mut c, &ok), Approved);
        assert_eq!(c.failed_verifications, 0);
        assert_eq!(run(&mut c, &bad_cvv), WrongCvv);
        assert_eq!(run(&mut c, &bad_cvv), WrongCvv);
        assert_eq!(c.state, CardState::Active);
        assert_eq!(run(&mut c, &bad_exp), WrongExpiry);
        assert_eq!(c.state, CardState::Blocked);
        assert_eq!(run(&mut c, &ok), Blocked);
        assert_eq!(Blocked.code(), "62");
        c.resume().unwrap();
        assert_eq!(run(&mut c, &ok), Approved);
    }

    #[test]
    fn merchant_locks() {
        let shop = MerchantId::parse("m", "shop-1").unwrap();
        let other = MerchantId::parse("m", "shop-2").unwrap();
        let mut c = new_card(PolicyInput {
            max_uses: 5,
            lock_to_first_merchant: true,
            ..input()
        });
        assert_eq!(pay_at(&mut c, None), MerchantNotAllowed);
        assert_eq!(pay_at(&mut c, Some(&shop)), Approved);
        assert_eq!(c.policy.merchant_id.as_ref(), Some(&shop));
        assert_eq!(pay_at(&mut c, Some(&other)), MerchantNotAllowed);
        assert_eq!(pay_at(&mut c, Some(&shop)), Approved);

        let mut fixed = new_card(PolicyInput {
            max_uses: 5,
            merchant_id: Some(shop.clone()),
            ..input()
        });
        assert_eq!(pay_at(&mut fixed, Some(&other)), MerchantNotAllowed);
        assert_eq!(pay_at(&mut fixed, None), MerchantNotAllowed);
        assert_eq!(pay_at(&mut fixed, Some(&shop)), Approved);
    }

    #[test]
    fn reversal_restores_the_cap_not_the_use() {
        let mut c = new_card(input());
        assert_eq!(pay(&mut c, eur(700)), Approved);
        reverse(&mut c, eur(200));
        assert_eq!(c.spent, eur(500));
        assert_eq!((c.uses, c.state), (1, CardState::Used));
        reverse(&mut c, eur(500));
        assert_eq!(c.remaining(), eur(5000));
    }

    #[test]
    fn expiry_instant_itself_is_still_valid() {
        let mut c = new_card(PolicyInput {
            max_uses: 2,
            ..input()
        });
        let a = good(&c, eur(1));
        let at = c.policy.valid_until;
        assert_eq!(authorize(&mut c, &a, at, 3), Approved);
        assert_eq!(
            authorize(&mut c, &a, at + time::Duration::seconds(1), 3),
            Expired
        );
    }
}
