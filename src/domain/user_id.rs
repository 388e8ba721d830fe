use std::fmt;

/// A GarminSync user id: 1 to 128 characters of `[A-Za-z0-9._@:-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserId(String);

impl UserId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("user_id must not be empty".into());
        }
        if raw.len() > Self::MAX_LEN {
            return Err(format!("user_id must be at most {} characters", Self::MAX_LEN));
        }
        if let Some(c) = raw.chars().find(|c| !(c.is_ascii_alphanumeric() || "._@:-".contains(*c))) {
            return Err(format!(
                "user_id may only contain letters, digits and . _ @ : - (found {:?})",
                c.escape_default().to_string()
            ));
        }
        Ok(Self(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in ["a", "user-1", "j.doe@example.com", "garmin:12345", "A_b", &"x".repeat(128)] {
            assert!(UserId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        for bad in ["", " ", "a b", "a/b", "é", "a\0", "a%2F", &"x".repeat(129), "a\nb"] {
            assert!(UserId::parse(bad).is_err(), "{bad:?}");
        }
    }
}
