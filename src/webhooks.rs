//! Webhooks: every card event POSTed to the bank's web app, signed.
//!
//! Delivery follows the Standard Webhooks convention
//! (<https://www.standardwebhooks.com>): a JSON body
//! `{"type": "card.authorized", "timestamp": ..., "data": {...}}` and the
//! headers `webhook-id` (the same for every retry of one event, so the
//! receiver can drop duplicates), `webhook-timestamp` (Unix seconds) and
//! `webhook-signature` (`v1,` + base64 HMAC-SHA256 of
//! `id.timestamp.body` under the hook's secret, `whsec_` + base64 in a
//! 0600 file).
//!
//! Why nothing is lost and an authorisation never waits for it: the events
//! are the ones [`crate::vault::events`] already stores in the same write as
//! each change. A deliverer per hook keeps, per owner, the sequence number
//! of the last event the receiver acknowledged (2xx) as a durable cursor in
//! the vault, and sends what comes after it, in order, from its own task.
//! A failure (timeout, refused connection, non-2xx) leaves the cursor where
//! it was and retries that owner later with exponential backoff (1 s
//! doubling to 5 minutes, for ever); other owners keep flowing. Delivery is
//! at least once: a crash between the receiver's 2xx and the cursor's
//! write sends that event again, with the same `webhook-id`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use ring::hmac;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{broadcast, watch};
use zeroize::Zeroizing;

use crate::domain::{Money, Owner};
use crate::vault::records::{self, decode, EventRecord};
use crate::vault::{Store, Vault, VaultError, Write};

/// Events sent per owner before the cursor is saved.
const PAGE: usize = 64;
/// The longest wait between two attempts for one owner.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How often every owner is checked even without a notification: events
/// written by another instance sharing a PostgreSQL store.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// One webhook, as configured (`[[webhooks]]` in the configuration file).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names the hook in logs and its cursors in the vault (letters, digits,
    /// `-` and `_`).
    pub name: String,
    /// Where events are POSTed (https:// in production).
    pub url: String,
    /// The signing secret. Default: `webhook-<name>.secret` in the keys
    /// directory, made on first start (give it to the receiver).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Only these owners' events (empty: every owner's).
    #[serde(default)]
    pub owners: Vec<String>,
    /// How long one POST may take before it counts as failed.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook {name}: {reason}")]
    Config { name: String, reason: String },
    #[error("webhook secret {path}: {reason}")]
    Secret { path: PathBuf, reason: String },
}

/// A configured webhook, ready to deliver. Its secret never reaches a log
/// or a Debug print.
pub struct Hook {
    name: String,
    url: reqwest::Url,
    secret: Zeroizing<Vec<u8>>,
    owners: Vec<Owner>,
    client: reqwest::Client,
}

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hook")
            .field("name", &self.name)
            .field("url", &self.url.as_str())
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl Hook {
    /// Checks `c` and loads (or makes) its secret.
    pub fn open(c: &WebhookConfig, keys_dir: &Path) -> Result<Hook, WebhookError> {
        let bad = |reason: String| WebhookError::Config {
            name: c.name.clone(),
            reason,
        };
        let name_ok = !c.name.is_empty()
            && c.name.len() <= 64
            && c.name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_');
        if !name_ok {
            return Err(bad(
                "name must be 1 to 64 letters, digits, '-' or '_'".into()
            ));
        }
        let url = reqwest::Url::parse(&c.url).map_err(|e| bad(format!("url {:?}: {e}", c.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad(format!("url {:?}: not http:// or https://", c.url)));
        }
        let owners = c
            .owners
            .iter()
            .map(|o| Owner::parse("owners", o).map_err(|e| bad(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let path = c
            .secret_file
            .clone()
            .unwrap_or_else(|| keys_dir.join(format!("webhook-{}.secret", c.name)));
        let secret = load_secret(&path)?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(c.timeout_ms.max(1)))
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| bad(format!("HTTP client: {e}")))?;
        Ok(Hook {
            name: c.name.clone(),
            url,
            secret,
            owners,
            client,
        })
    }

    fn wants(&self, owner: &str) -> bool {
        self.owners.is_empty() || self.owners.iter().any(|o| o.as_str() == owner)
    }

    /// POSTs one event; Ok when the receiver answered 2xx.
    async fn post(&self, owner: &Owner, seq: u64, event: &EventRecord) -> Result<(), String> {
        let id = message_id(owner, seq);
        let ts = time::OffsetDateTime::now_utc().unix_timestamp();
        let body = payload(seq, event);
        let signature = sign(&self.secret, &id, ts, &body);
        let response = self
            .client
            .post(self.url.clone())
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await
            .map_err(|e| format!("{}", e.without_url()))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the receiver answered {status}"))
        }
    }
}

/// Reads a `whsec_` secret, making one (32 random bytes, mode 0600) when the
/// file does not exist. A file group or others may read is refused.
pub fn load_secret(path: &Path) -> Result<Zeroizing<Vec<u8>>, WebhookError> {
    use crate::vault::keyfile;
    let err = |reason: String| WebhookError::Secret {
        path: path.to_path_buf(),
        reason,
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    if !path.exists() {
        let k = keyfile::random_key().map_err(|e| err(e.to_string()))?;
        let text = Zeroizing::new(format!("whsec_{}\n", b64.encode(&k[..])));
        keyfile::create_secret_file(path, text.as_bytes()).map_err(|e| err(e.to_string()))?;
        tracing::info!(path = %path.display(), "made a webhook signing secret: give it to the receiver");
    }
    let text = keyfile::read_secret_file(path).map_err(err)?;
    let encoded = text
        .trim()
        .strip_prefix("whsec_")
        .ok_or_else(|| err("not a webhook secret (expected whsec_ and base64)".into()))?;
    let secret = Zeroizing::new(
        b64.decode(encoded)
            .map_err(|_| err("not a webhook secret (expected whsec_ and base64)".into()))?,
    );
    if !(24..=64).contains(&secret.len()) {
        return Err(err("a webhook secret is 24 to 64 bytes".into()));
    }
    Ok(secret)
}

/// `v1,` and the base64 HMAC-SHA256 of `id.timestamp.body`.
pub fn sign(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(id.as_bytes());
    ctx.update(b".");
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    )
}

/// The id of one event's message: the same for every retry, different for
/// every event and owner, and without the owner's name in it.
pub fn message_id(owner: &Owner, seq: u64) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, owner.as_str().as_bytes());
    format!("msg_{}_{seq}", hex::encode(&digest.as_ref()[..12]))
}

fn money_json(minor: i64, currency: &str) -> serde_json::Value {
    let display = crate::domain::Currency::parse(currency)
        .map(|c| Money::new(minor, c).to_string())
        .unwrap_or_default();
    json!({ "amount_minor": minor, "currency": currency, "text": display })
}

/// The JSON body of one event. Card numbers appear masked only.
pub fn payload(seq: u64, e: &EventRecord) -> Vec<u8> {
    let kind = e.kind().map(|k| k.as_str()).unwrap_or("unknown");
    let occurred = time::OffsetDateTime::from_unix_timestamp(e.occurred_at)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    let mut data = json!({
        "cursor": crate::api::convert::event_cursor(seq),
        "card_id": e.card_id,
        "owner": e.owner,
        "masked_pan": e.masked_pan,
        "state": records::state_from_code(e.state).map(|s| s.as_str()).unwrap_or("unknown"),
        "remaining": money_json(e.remaining, &e.currency),
    });
    if let Some(amount) = e.amount {
        data["amount"] = money_json(amount, &e.amount_currency);
        data["transaction_id"] = json!(e.transaction_id);
    }
    if e.kind() == Some(records::EventKind::Authorized) {
        data["approved"] = json!(e.approved);
        data["response_code"] = json!(e.response_code);
        data["reason"] = json!(e.reason);
        data["merchant_id"] = json!(e.merchant_id);
        data["mcc"] = json!(e.mcc);
    }
    serde_json::to_vec(&json!({
        "type": format!("card.{kind}"),
        "timestamp": occurred,
        "data": data,
    }))
    .unwrap_or_default()
}

/// Where a hook's cursor for one owner is kept.
fn cursor_key(hook: &str, owner: &str) -> Vec<u8> {
    [b"w/", hook.as_bytes(), b"\0", owner.as_bytes()].concat()
}

fn be_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

/// Delivers one hook's events until `stop` turns true.
pub async fn run(vault: Arc<Vault>, hook: Hook, mut stop: watch::Receiver<bool>) {
    let store = vault.store();
    let mut notified = vault.events().listen();
    // Owner → (when to try next, failures in a row).
    let mut due: BTreeMap<String, (Instant, u32)> = BTreeMap::new();
    let mut next_sweep = Instant::now();
    loop {
        if *stop.borrow() {
            return;
        }
        let now = Instant::now();
        if now >= next_sweep {
            match sweep(store.as_ref(), &hook).await {
                Ok(owners) => {
                    for o in owners {
                        due.entry(o).or_insert((now, 0));
                    }
                }
                Err(e) => {
                    tracing::warn!(hook = %hook.name, error = %e, "webhook: cannot list owners with events; retrying")
                }
            }
            next_sweep = now + SWEEP_EVERY;
        }
        let ready: Vec<String> = due
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(o, _)| o.clone())
            .collect();
        for owner in ready {
            if *stop.borrow() {
                return;
            }
            match deliver_owner(store.as_ref(), &hook, &owner).await {
                Ok(()) => {
                    due.remove(&owner);
                }
                Err(e) => {
                    let failures = due.get(&owner).map_or(0, |d| d.1) + 1;
                    let wait = Duration::from_secs(1 << failures.min(9)).min(MAX_BACKOFF);
                    tracing::warn!(hook = %hook.name, failures, retry_in = ?wait, error = %e, "webhook delivery failed; the events are kept and retried");
                    due.insert(owner, (Instant::now() + wait, failures));
                }
            }
        }
        let wake = due
            .values()
            .map(|(at, _)| *at)
            .min()
            .unwrap_or(next_sweep)
            .min(next_sweep);
        tokio::select! {
            r = notified.recv() => match r {
                Ok(owner) => {
                    if hook.wants(&owner) {
                        due.entry(owner.to_string()).or_insert((Instant::now(), 0));
                    }
                }
                // Missed some notifications: look at every owner.
                Err(broadcast::error::RecvError::Lagged(_)) => next_sweep = Instant::now(),
                Err(broadcast::error::RecvError::Closed) => return,
            },
            () = tokio::time::sleep_until(wake.into()) => {}
            _ = stop.changed() => {}
        }
    }
}

/// The owners whose last event is past this hook's cursor.
async fn sweep(store: &dyn Store, hook: &Hook) -> Result<Vec<String>, VaultError> {
    let mut out = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store.scan(b"n/", after.as_deref(), 512).await?;
        for (key, value) in &page {
            let Ok(owner) = std::str::from_utf8(&key[2..]) else {
                continue;
            };
            if !hook.wants(owner) {
                continue;
            }
            let last = be_u64(value).unwrap_or(0);
            let sent = store
                .get(&cursor_key(&hook.name, owner))
                .await?
                .and_then(|b| be_u64(&b))
                .unwrap_or(0);
            if last > sent {
                out.push(owner.to_string());
            }
        }
        match page.last() {
            Some((k, _)) if page.len() == 512 => after = Some(k.clone()),
            _ => return Ok(out),
        }
    }
}

/// Sends `owner`'s events after the hook's cursor, in order, saving the
/// cursor as they are acknowledged.
async fn deliver_owner(store: &dyn Store, hook: &Hook, owner: &str) -> Result<(), String> {
    let owner = Owner::parse("owner", owner).map_err(|e| e.to_string())?;
    let ckey = cursor_key(&hook.name, owner.as_str());
    let prefix = records::event_prefix(&owner);
    loop {
        let mut sent = store
            .get(&ckey)
            .await
            .map_err(|e| e.to_string())?
            .and_then(|b| be_u64(&b))
            .unwrap_or(0);
        // Events the retention pass deleted before this hook got them.
        let floor = crate::vault::events::purged_floor(store, &owner)
            .await
            .map_err(|e| e.to_string())?;
        if floor > sent {
            tracing::warn!(hook = %hook.name, owner = %owner, after = sent, floor, "events were deleted by retention before this hook received them: delivering from after them");
            sent = floor;
        }
        let from = (sent > 0).then(|| records::event_key(&owner, sent));
        let page = store
            .scan(&prefix, from.as_deref(), PAGE)
            .await
            .map_err(|e| e.to_string())?;
        if page.is_empty() {
            return Ok(());
        }
        // Never send an event that a crash could still take back.
        store.sync().await.map_err(|e| e.to_string())?;
        let start = sent;
        let mut failure = None;
        for (key, value) in &page {
            let Some(seq) = records::event_seq(&prefix, key) else {
                continue;
            };
            if seq != sent + 1 {
                // Not yet visible (another instance's write): later.
                break;
            }
            let event: EventRecord = decode("event", value).map_err(|e| e.to_string())?;
            if let Err(e) = hook.post(&owner, seq, &event).await {
                failure = Some(e);
                break;
            }
            sent = seq;
        }
        if sent > start {
            let k = ckey.clone();
            let v = sent.to_be_bytes().to_vec();
            store
                .update(std::slice::from_ref(&ckey), &mut |_| {
                    vec![Write::Put(k.clone(), v.clone())]
                })
                .await
                .map_err(|e| e.to_string())?;
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if sent == start || page.len() < PAGE {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_standard_webhooks_one() {
        // The example of the Standard Webhooks specification's reference
        // libraries: secret whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw.
        let secret = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        let sig = sign(
            &secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn message_ids_are_stable_distinct_and_hide_the_owner() {
        let alice = Owner::parse("owner", "alice").unwrap();
        let bob = Owner::parse("owner", "bob").unwrap();
        assert_eq!(message_id(&alice, 7), message_id(&alice, 7));
        assert_ne!(message_id(&alice, 7), message_id(&alice, 8));
        assert_ne!(message_id(&alice, 7), message_id(&bob, 7));
        assert!(!message_id(&alice, 7).contains("alice"));
    }

    #[test]
    fn a_secret_is_made_private_and_a_readable_one_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hook.secret");
        let made = load_secret(&path).unwrap();
        assert_eq!(made.len(), 32);
        assert_eq!(load_secret(&path).unwrap(), made);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_secret(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(!err.contains("whsec_"), "{err}");
    }

    #[test]
    fn a_bad_name_or_url_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let c = |name: &str, url: &str| WebhookConfig {
            name: name.into(),
            url: url.into(),
            secret_file: None,
            owners: vec![],
            timeout_ms: 1000,
        };
        let e = Hook::open(&c("a b", "http://x"), dir.path()).unwrap_err();
        assert!(e.to_string().contains("name"), "{e}");
        let e = Hook::open(&c("bank", "ftp://x"), dir.path()).unwrap_err();
        assert!(e.to_string().contains("url"), "{e}");
        let h = Hook::open(&c("bank", "http://127.0.0.1:1/hook"), dir.path()).unwrap();
        assert!(!format!("{h:?}").contains("whsec_"));
    }
}
