//! Micro-benchmarks (criterion): the pure core, the crypto, and the vault
//! in-process over sled with durability on. Run by hand:
//! `cargo bench --bench core` (or `-- vault` for one group); CI only builds
//! them. Figures and how to read them: BENCHMARKS.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use zeroize::Zeroizing;

use vcn::config::Config;
use vcn::domain::card::{PolicyBounds, PolicyInput};
use vcn::domain::decision::{self, Attempt};
use vcn::domain::number::NumberPlan;
use vcn::domain::pan::{luhn_check_digit, luhn_valid};
use vcn::domain::{Card, CardId, CardPolicy, CardState, Cvv, Mcc, MerchantId, Money, Owner, Pan};
use vcn::vault::crypto::{Keyring, RandomDigits, KEY_LEN};
use vcn::vault::embedded::{EngineOptions, Fjall3Store};
use vcn::vault::{system_clock, AuthorizeRequest, IssueRequest, IssuedCard, Presented, Vault};

const FUNDING: &str = "4111111111111111";

fn keyring() -> Keyring {
    Keyring::single(&Zeroizing::new([7u8; KEY_LEN]))
}

fn eur(n: i64) -> Money {
    Money::parse(n, "EUR").unwrap()
}

fn domain(c: &mut Criterion) {
    let mut g = c.benchmark_group("domain");
    g.bench_function("luhn_valid_16", |b| {
        b.iter(|| luhn_valid(std::hint::black_box("4111111111111111")))
    });
    g.bench_function("luhn_check_digit_15", |b| {
        b.iter(|| luhn_check_digit(std::hint::black_box("411111111111111")))
    });
    let keys = keyring();
    let plan = NumberPlan::new(6, "").unwrap();
    let funding = Pan::parse(FUNDING).unwrap();
    g.bench_function("number_candidate_csprng", |b| {
        b.iter(|| {
            let mut rng = RandomDigits::new(&keys);
            plan.candidate(&funding, &mut rng).unwrap()
        })
    });

    let now = time::OffsetDateTime::now_utc();
    let bounds = PolicyBounds {
        default_validity: time::Duration::days(30),
        max_validity: time::Duration::days(5 * 366),
    };
    let policy = CardPolicy::new(
        PolicyInput {
            spend_limit: eur(1_000_000_000),
            per_transaction_limit: Some(eur(10_000)),
            max_uses: u32::MAX,
            valid_until: None,
            merchant_id: None,
            lock_to_first_merchant: false,
            allowed_mccs: vec![Mcc::parse("5411").unwrap()],
            blocked_mccs: vec![],
        },
        now,
        bounds,
    )
    .unwrap();
    let card = Card {
        id: CardId::from_random(&[7; 12]),
        owner: Owner::parse("owner", "cust-1").unwrap(),
        masked_pan: "411111******1234".into(),
        last4: "1234".into(),
        expiry: vcn::domain::Expiry::of(policy.valid_until),
        spent: eur(0),
        policy,
        state: CardState::Active,
        uses: 0,
        failed_verifications: 0,
        created_at: now,
    };
    let merchant = MerchantId::parse("merchant_id", "shop-1").unwrap();
    let attempt = Attempt {
        expiry: card.expiry,
        cvv_ok: true,
        amount: eur(100),
        merchant_id: Some(&merchant),
        mcc: Some(Mcc::parse("5411").unwrap()),
    };
    g.bench_function("authorize_decision", |b| {
        b.iter_batched_ref(
            || card.clone(),
            |c| decision::authorize(c, &attempt, now, 3),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn crypto(c: &mut Criterion) {
    let mut g = c.benchmark_group("crypto");
    let keys = keyring();
    let funding = Pan::parse(FUNDING).unwrap();
    let token = Pan::with_check_digit("411111444444444").unwrap();
    let id = "vc_0123456789abcdef01234567";
    g.bench_function("seal_pan_pair_aes_gcm", |b| {
        b.iter(|| keys.seal(id, &funding, &token).unwrap())
    });
    let sealed = keys.seal(id, &funding, &token).unwrap();
    g.bench_function("open_funding_aes_gcm", |b| {
        b.iter(|| keys.open_funding(id, &sealed).unwrap())
    });
    let v = keys.current_version();
    g.bench_function("pan_index_hmac_sha256", |b| {
        b.iter(|| keys.pan_index(v, &token).unwrap())
    });
    let expiry = vcn::domain::Expiry::of(time::OffsetDateTime::now_utc());
    let cvv = keys.cvv(v, &token, expiry).unwrap();
    g.bench_function("verify_cvv_hmac", |b| {
        b.iter(|| keys.verify_cvv(v, &token, expiry, &cvv))
    });
    g.finish();
}

/// Who the benchmark's calls are from, in the audit log.
fn actor() -> vcn::audit::Actor {
    vcn::audit::Actor::new("bench", "admin", "-")
}

struct Bench {
    rt: tokio::runtime::Runtime,
    vault: Arc<Vault>,
    _dir: tempfile::TempDir,
}

fn open_vault() -> Bench {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Fjall3Store::open(dir.path(), &EngineOptions::default()).unwrap();
    let vault = rt
        .block_on(Vault::open(
            Arc::new(store),
            Arc::new(keyring()),
            Config::default().vault().unwrap(),
            system_clock(),
        ))
        .unwrap();
    Bench {
        rt,
        vault: Arc::new(vault),
        _dir: dir,
    }
}

fn issue_req(uses: u32) -> IssueRequest {
    IssueRequest {
        funding_pan: Pan::parse(FUNDING).unwrap(),
        owner: Owner::parse("owner", "bench").unwrap(),
        policy: PolicyInput {
            spend_limit: eur(1_000_000_000_000),
            per_transaction_limit: None,
            max_uses: uses,
            valid_until: None,
            merchant_id: None,
            lock_to_first_merchant: false,
            allowed_mccs: vec![],
            blocked_mccs: vec![],
        },
        idempotency_key: None,
    }
}

fn auth_req(card: &IssuedCard, txn: String) -> AuthorizeRequest {
    AuthorizeRequest {
        transaction_id: txn,
        pan: Presented::Pan(card.pan.clone()),
        expiry: card.card.expiry,
        cvv: Cvv::parse(card.cvv.expose()).unwrap(),
        amount: eur(100),
        merchant_id: None,
        mcc: None,
    }
}

/// The vault with durability on: one call at a time (each waits for its
/// own sync) and 64 at once (they share syncs: group commit).
fn vault(c: &mut Criterion) {
    let mut g = c.benchmark_group("vault");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    let b = open_vault();
    let vault = b.vault.clone();
    g.bench_function("issue_one_durable", |bn| {
        bn.iter(|| b.rt.block_on(vault.issue(issue_req(1), &actor())).unwrap())
    });
    let cards: Vec<Arc<IssuedCard>> = (0..64)
        .map(|_| {
            Arc::new(
                b.rt.block_on(vault.issue(issue_req(u32::MAX), &actor()))
                    .unwrap(),
            )
        })
        .collect();
    let mut n = 0u64;
    g.bench_function("authorize_one_durable", |bn| {
        bn.iter(|| {
            n += 1;
            let o =
                b.rt.block_on(vault.authorize(&auth_req(&cards[0], format!("one-{n}")), &actor()))
                    .unwrap();
            assert!(o.code.is_approved());
        })
    });
    g.bench_function("detokenize", |bn| {
        bn.iter(|| {
            b.rt.block_on(vault.detokenize(&cards[1].pan, &actor()))
                .unwrap()
        })
    });
    g.throughput(Throughput::Elements(64));
    let mut m = 0u64;
    g.bench_function("authorize_64_at_once_durable", |bn| {
        bn.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                m += 1;
                b.rt.block_on(async {
                    let tasks: Vec<_> = cards
                        .iter()
                        .enumerate()
                        .map(|(i, card)| {
                            let (vault, req) =
                                (vault.clone(), auth_req(card, format!("many-{m}-{i}")));
                            tokio::spawn(async move { vault.authorize(&req, &actor()).await })
                        })
                        .collect();
                    for t in tasks {
                        assert!(t.await.unwrap().unwrap().code.is_approved());
                    }
                });
            }
            start.elapsed()
        })
    });
    g.bench_function("issue_64_at_once_durable", |bn| {
        bn.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                b.rt.block_on(async {
                    let tasks: Vec<_> = (0..64)
                        .map(|_| {
                            let vault = vault.clone();
                            tokio::spawn(async move { vault.issue(issue_req(1), &actor()).await })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap().unwrap();
                    }
                });
            }
            start.elapsed()
        })
    });
    g.finish();
}

criterion_group!(benches, domain, crypto, vault);
criterion_main!(benches);
