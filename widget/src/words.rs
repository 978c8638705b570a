//! gRPC failures in plain words, for the window.

use std::time::Duration;

use tonic::{Code, Status};

/// What went wrong with a call, for a person. `server` is the address the
/// widget talks to. The service's own messages never carry card numbers, so
/// they may be quoted.
pub fn plain(status: &Status, server: &str) -> String {
    let msg = status.message();
    match status.code() {
        Code::Unavailable | Code::Cancelled => format!(
            "the card service at {server} cannot be reached. Is it running? (it will be tried again)"
        ),
        Code::Unauthenticated => {
            "the card service did not accept this widget's key. Check api_key in the widget's config file (or VCN_WIDGET_KEY)."
                .to_string()
        }
        Code::PermissionDenied => format!("this widget's key is not allowed to do that: {msg}"),
        // The widget never names an owner: its key must be pinned to one.
        Code::InvalidArgument if msg.starts_with("owner") => {
            "this widget's key is not tied to a cardholder; ask the bank for a key made with `vcn client add NAME --role cards --owner CUSTOMER`"
                .to_string()
        }
        Code::InvalidArgument | Code::OutOfRange => format!("the card service refused it: {msg}"),
        Code::NotFound => "that card no longer exists".to_string(),
        Code::FailedPrecondition => format!("not possible now: {msg}"),
        Code::DeadlineExceeded => "the card service took too long to answer; try again".to_string(),
        Code::ResourceExhausted => "the card service is busy; try again in a moment".to_string(),
        _ => format!("the card service failed ({msg})"),
    }
}

/// A call the widget gave up waiting for.
pub fn timed_out(server: &str, after: Duration) -> String {
    format!(
        "the card service at {server} did not answer within {} seconds; try again",
        after.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_what_to_do() {
        let s = "http://127.0.0.1:1";
        assert!(plain(&Status::unavailable("tcp connect error"), s).contains("cannot be reached"));
        assert!(plain(&Status::unauthenticated("unknown API key"), s).contains("api_key"));
        assert_eq!(
            plain(&Status::invalid_argument("spend_limit: too high"), s),
            "the card service refused it: spend_limit: too high"
        );
        assert!(plain(&Status::invalid_argument("owner: is required"), s).contains("--owner"));
        assert!(timed_out(s, Duration::from_secs(10)).contains("within 10 seconds"));
    }
}
