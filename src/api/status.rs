//! The one place errors become gRPC statuses.

use tonic::{Code, Status};

use crate::domain::FieldError;
use crate::vault::VaultError;

impl From<VaultError> for Status {
    fn from(e: VaultError) -> Status {
        let code = match &e {
            VaultError::InvalidArgument(_) => Code::InvalidArgument,
            VaultError::NotFound(_) => Code::NotFound,
            VaultError::FailedPrecondition(_) => Code::FailedPrecondition,
            VaultError::AlreadyExists(_) => Code::AlreadyExists,
            VaultError::ResourceExhausted(_) => Code::ResourceExhausted,
            VaultError::Unavailable(_) => Code::Unavailable,
            VaultError::Internal(_) => Code::Internal,
        };
        if code == Code::Internal || code == Code::Unavailable {
            tracing::error!(error = %e, "request failed");
        }
        Status::new(code, e.to_string())
    }
}

/// A malformed request field: INVALID_ARGUMENT, the message naming it.
pub fn invalid(e: FieldError) -> Status {
    Status::invalid_argument(e.to_string())
}

impl From<FieldError> for Status {
    fn from(e: FieldError) -> Status {
        invalid(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_vault_error_has_its_code_and_message() {
        let s: Status = VaultError::InvalidArgument(FieldError::new("owner", "is required")).into();
        assert_eq!(
            (s.code(), s.message()),
            (Code::InvalidArgument, "owner: is required")
        );
        let s: Status = VaultError::NotFound("card vc_1".into()).into();
        assert_eq!(
            (s.code(), s.message()),
            (Code::NotFound, "card vc_1 not found")
        );
        assert_eq!(
            Status::from(VaultError::FailedPrecondition("x".into())).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            Status::from(VaultError::AlreadyExists("x".into())).code(),
            Code::AlreadyExists
        );
        assert_eq!(
            Status::from(VaultError::ResourceExhausted("x".into())).code(),
            Code::ResourceExhausted
        );
        assert_eq!(
            Status::from(VaultError::Unavailable("x".into())).code(),
            Code::Unavailable
        );
        assert_eq!(
            Status::from(VaultError::Internal("x".into())).code(),
            Code::Internal
        );
    }
}
