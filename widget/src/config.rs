//! The widget's configuration: where the service is, the owner-pinned API
//! key, and the cardholder's funding cards.
//!
//! A funding card is named by the id of a card the bank already issued on
//! it (IssueCard's `funding_card_id`): the widget never holds a real card
//! number, in the file or in memory. The file holds the API key, so it must
//! be readable by its owner only (mode 0600): a file others can read is
//! refused, with the command that fixes it. The key may come from the
//! environment instead (`VCN_WIDGET_KEY`), and then the file holds none.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use vcn::domain::{CardId, Currency};
use zeroize::Zeroizing;

/// The environment variable that gives the API key (it wins over the file).
pub const KEY_ENV: &str = "VCN_WIDGET_KEY";

/// One of the cardholder's real cards, that virtual numbers are made for.
#[derive(Clone)]
pub struct FundingCard {
    /// What the cardholder calls it ("Visa debit ending 1111").
    pub label: String,
    /// A card the bank issued on this funding card: new cards get the
    /// same funding card.
    pub card_id: CardId,
}

impl FundingCard {
    /// As shown in the chooser.
    pub fn display(&self) -> String {
        self.label.clone()
    }
}

impl fmt::Debug for FundingCard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}

/// The API key: never shown.
#[derive(Clone)]
pub struct ApiKey(Zeroizing<String>);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> ApiKey {
        ApiKey(Zeroizing::new(key.into()))
    }

    /// The key itself, for the authorization header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// The loaded configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The service's address, e.g. `http://127.0.0.1:50051`.
    pub server: String,
    pub api_key: ApiKey,
    pub funding_cards: Vec<FundingCard>,
    /// The currency the amount field starts with.
    pub currency: Currency,
    /// How long a new number, expiry and CVV stay on screen.
    pub reveal_for: Duration,
    /// How long one call may take before the widget gives up on it.
    pub call_timeout: Duration,
}

impl Settings {
    /// Settings for `server` and `key` with the defaults of the file.
    pub fn new(
        server: impl Into<String>,
        api_key: ApiKey,
        funding_cards: Vec<FundingCard>,
    ) -> Self {
        Settings {
            server: server.into(),
            api_key,
            funding_cards,
            currency: Currency::parse(DEFAULT_CURRENCY).unwrap_or_else(|_| unreachable!()),
            reveal_for: Duration::from_secs(DEFAULT_REVEAL_SECONDS),
            call_timeout: Duration::from_secs(DEFAULT_CALL_TIMEOUT_SECONDS),
        }
    }
}

const DEFAULT_CURRENCY: &str = "EUR";
const DEFAULT_REVEAL_SECONDS: u64 = 60;
const DEFAULT_CALL_TIMEOUT_SECONDS: u64 = 10;

/// The file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default = "default_server")]
    server: String,
    #[serde(default)]
    api_key: Option<String>,
    #[serde(default = "default_currency")]
    currency: String,
    #[serde(default = "default_reveal")]
    reveal_seconds: u64,
    #[serde(default = "default_timeout")]
    call_timeout_seconds: u64,
    #[serde(default)]
    funding_cards: Vec<FileCard>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCard {
    label: String,
    card_id: String,
}

fn default_server() -> String {
    "http://127.0.0.1:50051".into()
}
fn default_currency() -> String {
    DEFAULT_CURRENCY.into()
}
fn default_reveal() -> u64 {
    DEFAULT_REVEAL_SECONDS
}
fn default_timeout() -> u64 {
    DEFAULT_CALL_TIMEOUT_SECONDS
}

/// Why the configuration cannot be used. Never carries a key or a number.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path} can be read by other users (mode {mode:o}); it holds your API key: run `chmod 600 {path}`")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Where the file is looked for without `--config`:
/// `$XDG_CONFIG_HOME/vcn-widget/config.toml`, else `~/.config/vcn-widget/config.toml`.
pub fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("vcn-widget").join("config.toml"))
}

/// Loads the file at `path`; `env_key` (the value of [`KEY_ENV`], if set)
/// wins over the file's `api_key`.
pub fn load(path: &Path, env_key: Option<String>) -> Result<Settings, ConfigError> {
    use std::os::unix::fs::MetadataExt;
    let read_err = |e: std::io::Error| ConfigError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ConfigError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(read_err)?);
    parse(&text, env_key).map_err(|reason| ConfigError::Invalid {
        path: path.to_path_buf(),
        reason,
    })
}

/// Parses the file's text. The error names the setting, never its value.
pub fn parse(text: &str, env_key: Option<String>) -> Result<Settings, String> {
    // toml's messages quote the offending line, which may hold a number or
    // the key: keep only the setting's name.
    let file: File = toml::from_str(text).map_err(|e| {
        let span = e
            .span()
            .map(|s| text[..s.start].lines().count())
            .unwrap_or(0);
        format!(
            "not a valid widget configuration (line {span}): {}",
            first_sentence(e.message())
        )
    })?;
    let key = env_key
        .filter(|k| !k.trim().is_empty())
        .or(file.api_key)
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
        .ok_or_else(|| format!("api_key is missing: set it in the file or in {KEY_ENV}"))?;
    if !(file.server.starts_with("http://") || file.server.starts_with("https://")) {
        return Err("server must start with http:// or https://".into());
    }
    let currency = Currency::parse(&file.currency).map_err(|e| e.to_string())?;
    if file.funding_cards.is_empty() {
        return Err("add at least one [[funding_cards]] with a label and a card_id".into());
    }
    let mut cards = Vec::new();
    for (i, c) in file.funding_cards.into_iter().enumerate() {
        let card_id = CardId::parse("card_id", c.card_id.trim())
            .map_err(|e| format!("funding_cards[{i}].card_id: {}", e.reason))?;
        if c.label.trim().is_empty() {
            return Err(format!("funding_cards[{i}].label is empty"));
        }
        cards.push(FundingCard {
            label: c.label.trim().to_string(),
            card_id,
        });
    }
    if file.reveal_seconds == 0 || file.call_timeout_seconds == 0 {
        return Err("reveal_seconds and call_timeout_seconds must be at least 1".into());
    }
    Ok(Settings {
        server: file.server,
        api_key: ApiKey::new(key),
        funding_cards: cards,
        currency,
        reveal_for: Duration::from_secs(file.reveal_seconds),
        call_timeout: Duration::from_secs(file.call_timeout_seconds),
    })
}

/// The first line of a parser message, with every quoted value that is not
/// a plain setting name and every long digit run taken out: serde quotes
/// values ("invalid type: integer `4111…`"), and a value may be a card
/// number or the key.
fn first_sentence(m: &str) -> String {
    let line = m.lines().next().unwrap_or(m);
    let mut out = String::new();
    for (i, part) in line.split('`').enumerate() {
        let quoted = i % 2 == 1;
        let name_like = part
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.');
        if quoted {
            out.push('`');
            out.push_str(if name_like { part } else { "…" });
            out.push('`');
        } else {
            out.push_str(&redact_digits(part));
        }
    }
    out
}

fn redact_digits(s: &str) -> String {
    let mut out = String::new();
    let mut run = String::new();
    for c in s.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_digit() {
            run.push(c);
            continue;
        }
        out.push_str(if run.len() >= 6 { "…" } else { &run });
        run.clear();
        out.push(c);
    }
    out.pop();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const GOOD: &str = r#"
server = "http://127.0.0.1:50051"
api_key = "vcn_secretkey"
reveal_seconds = 30
[[funding_cards]]
label = "Visa debit ending 1111"
card_id = "vc_0123456789abcdef01234567"
"#;

    #[test]
    fn parses_a_good_file_and_never_shows_secrets() {
        let s = parse(GOOD, None).unwrap();
        assert_eq!(s.api_key.expose(), "vcn_secretkey");
        assert_eq!(s.reveal_for, Duration::from_secs(30));
        assert_eq!(s.funding_cards[0].display(), "Visa debit ending 1111");
        assert_eq!(
            s.funding_cards[0].card_id.as_str(),
            "vc_0123456789abcdef01234567"
        );
        let debug = format!("{s:?}");
        assert!(!debug.contains("secretkey"), "{debug}");
    }

    #[test]
    fn the_environment_key_wins() {
        let s = parse(GOOD, Some("vcn_fromenv".into())).unwrap();
        assert_eq!(s.api_key.expose(), "vcn_fromenv");
        let no_key = GOOD.replace("api_key = \"vcn_secretkey\"", "");
        assert!(parse(&no_key, None).unwrap_err().contains("api_key"));
        assert_eq!(
            parse(&no_key, Some("k".into())).unwrap().api_key.expose(),
            "k"
        );
    }

    #[test]
    fn bad_settings_are_named_without_their_value() {
        let as_integer = GOOD.replace("\"vcn_secretkey\"", "4111111111111111");
        let e = parse(&as_integer, None).unwrap_err();
        assert!(e.contains("not a valid widget configuration"), "{e}");
        assert!(!e.contains("4111111111"), "{e}");
        let bad_id = GOOD.replace("vc_0123456789abcdef01234567", "4111111111111111");
        let e = parse(&bad_id, None).unwrap_err();
        assert!(e.contains("funding_cards[0].card_id"), "{e}");
        assert!(!e.contains("4111111111111111"), "{e}");
        // The old form, a real card number in the file, is refused.
        let with_pan = GOOD.replace("card_id =", "pan = \"4111111111111111\"\ncard_id =");
        let e = parse(&with_pan, None).unwrap_err();
        assert!(e.contains("pan"), "{e}");
        assert!(!e.contains("4111111111111111"), "{e}");
        let typo = GOOD.replace("reveal_seconds", "reveal_secs");
        let e = parse(&typo, None).unwrap_err();
        assert!(e.contains("reveal_secs"), "{e}");
        assert!(!e.contains("secretkey"), "{e}");
        let e = parse(&GOOD.replace("http://", "ftp://"), None).unwrap_err();
        assert!(e.contains("server"), "{e}");
    }

    #[test]
    fn a_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, GOOD).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load(&path, None).unwrap_err();
        assert!(
            matches!(e, ConfigError::Permissions { mode: 0o644, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load(&path, None).unwrap().funding_cards.len(), 1);
    }
}
