//! MFA challenges and login sessions: the vocabulary and the session state machine.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use zeroize::Zeroizing;

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $s:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
        pub enum $name { $(#[serde(rename = $s)] $variant),* }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $s),* }
            }
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($s => Some(Self::$variant),)* _ => None }
            }
        }
    };
}

string_enum!(
    /// How the code reaches the user.
    Method { Email => "email", Sms => "sms", Totp => "totp", Push => "push" }
);

string_enum!(
    /// Who checks the code: this service (`service`), or Garmin (`external`).
    Verifier { Service => "service", External => "external" }
);

string_enum!(
    ChallengeStatus {
        Pending => "pending",
        Verified => "verified",
        Consumed => "consumed",
        Failed => "failed",
        Expired => "expired",
        Cancelled => "cancelled",
    }
);

string_enum!(
    /// The state of one login flow.
    SessionState {
        Started => "started",
        MfaRequired => "mfa_required",
        MfaVerified => "mfa_verified",
        Authenticated => "authenticated",
        Failed => "failed",
        Cancelled => "cancelled",
        Expired => "expired",
        Superseded => "superseded",
    }
);

impl SessionState {
    pub const ACTIVE: [SessionState; 3] = [SessionState::Started, SessionState::MfaRequired, SessionState::MfaVerified];

    pub fn is_terminal(self) -> bool {
        !Self::ACTIVE.contains(&self)
    }

    /// `started` → `mfa_required` | `authenticated`; `mfa_required` → `mfa_verified`;
    /// `mfa_verified` → `authenticated`; any non-terminal → `failed` | `cancelled` | `expired` |
    /// `superseded`.
    pub fn can_move_to(self, to: SessionState) -> bool {
        use SessionState::*;
        if self.is_terminal() {
            return false;
        }
        matches!(
            (self, to),
            (Started, MfaRequired | Authenticated)
                | (MfaRequired, MfaVerified)
                | (MfaVerified, Authenticated)
                | (_, Failed | Cancelled | Expired | Superseded)
        )
    }
}

/// The masked form of a destination, the only form stored: `j***@example.com`, `*******1234`.
pub fn mask_destination(method: Method, raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    if raw.is_empty() || raw.chars().count() > 254 || raw.chars().any(char::is_control) {
        return Err("destination must be 1-254 characters without control characters".into());
    }
    if let Some((local, domain)) = raw.split_once('@') {
        if local.is_empty() || domain.is_empty() || domain.contains('@') {
            return Err("destination is not a valid e-mail address".into());
        }
        let first: String = local.chars().take(1).collect();
        return Ok(format!("{first}***@{domain}"));
    }
    if method == Method::Email {
        return Err("destination must be an e-mail address for method email".into());
    }
    let digits: Vec<char> = raw.chars().filter(char::is_ascii_digit).collect();
    let phone_like = raw.chars().all(|c| c.is_ascii_digit() || " +-().".contains(c));
    if phone_like {
        if !(4..=20).contains(&digits.len()) {
            return Err("destination phone number must have 4-20 digits".into());
        }
        let last4: String = digits[digits.len() - 4..].iter().collect();
        return Ok(format!("{}{last4}", "*".repeat(digits.len() - 4)));
    }
    if method == Method::Sms {
        return Err("destination must be a phone number for method sms".into());
    }
    // A device name (totp, push): keep its first character only.
    let first: String = raw.chars().take(1).collect();
    Ok(format!("{first}***"))
}

/// A one-time code as given by a caller: 4-16 letters or digits.
pub fn validate_code(code: &str) -> Result<(), String> {
    if (4..=16).contains(&code.len()) && code.chars().all(|c| c.is_ascii_alphanumeric()) {
        Ok(())
    } else {
        Err("code must be 4-16 letters or digits".into())
    }
}

/// A fresh random 6-digit code.
pub fn generate_code() -> Zeroizing<String> {
    Zeroizing::new(format!("{:06}", rand::random_range(0..1_000_000u32)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_like_the_contract_says() {
        assert_eq!(mask_destination(Method::Email, "john@example.com").unwrap(), "j***@example.com");
        assert_eq!(mask_destination(Method::Sms, "+1 (555) 123-1234").unwrap(), "*******1234");
        assert_eq!(mask_destination(Method::Sms, "5551231234").unwrap(), "******1234");
        assert_eq!(mask_destination(Method::Push, "Pixel 8").unwrap(), "P***");
        for (m, bad) in
            [(Method::Email, "nobody"), (Method::Sms, "call me"), (Method::Sms, "123"), (Method::Email, "@x")]
        {
            assert!(mask_destination(m, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn session_transitions_follow_the_state_machine() {
        use SessionState::*;
        assert!(Started.can_move_to(MfaRequired));
        assert!(Started.can_move_to(Authenticated));
        assert!(MfaRequired.can_move_to(MfaVerified));
        assert!(MfaVerified.can_move_to(Authenticated));
        assert!(!MfaRequired.can_move_to(Authenticated));
        assert!(!Started.can_move_to(MfaVerified));
        assert!(!Started.can_move_to(Started));
        for t in [Failed, Cancelled, Expired, Superseded] {
            assert!(Started.can_move_to(t) && MfaVerified.can_move_to(t));
        }
        for terminal in [Authenticated, Failed, Cancelled, Expired, Superseded] {
            assert!(!terminal.can_move_to(Failed));
        }
    }

    #[test]
    fn codes() {
        let c = generate_code();
        assert_eq!(c.len(), 6);
        assert!(validate_code(&c).is_ok());
        assert!(validate_code("12").is_err() && validate_code("12 34").is_err());
    }
}
