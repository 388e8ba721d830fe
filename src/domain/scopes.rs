use std::fmt;

/// What an API key may do. `admin` implies every other scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    TokensRead,
    TokensWrite,
    Mfa,
    Sessions,
    AuditRead,
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 6] =
        [Scope::TokensRead, Scope::TokensWrite, Scope::Mfa, Scope::Sessions, Scope::AuditRead, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::TokensRead => "tokens:read",
            Self::TokensWrite => "tokens:write",
            Self::Mfa => "mfa",
            Self::Sessions => "sessions",
            Self::AuditRead => "audit:read",
            Self::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|sc| sc.as_str() == s)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of scopes, stored space-separated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scopes(Vec<Scope>);

impl Scopes {
    pub fn new(mut v: Vec<Scope>) -> Self {
        v.sort();
        v.dedup();
        Self(v)
    }
    pub fn allows(&self, s: Scope) -> bool {
        self.0.contains(&s) || self.0.contains(&Scope::Admin)
    }
    /// Parses the stored form; unknown words are an error naming them.
    pub fn parse_list(s: &str) -> Result<Self, String> {
        s.split([' ', ','])
            .filter(|w| !w.is_empty())
            .map(|w| Scope::parse(w).ok_or_else(|| format!("unknown scope '{w}'")))
            .collect::<Result<Vec<_>, _>>()
            .map(Self::new)
    }
    pub fn to_stored(&self) -> String {
        self.0.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_implies_all_and_parse_round_trips() {
        let admin = Scopes::parse_list("admin").unwrap();
        assert!(Scope::ALL.iter().all(|s| admin.allows(*s)));
        let rw = Scopes::parse_list("tokens:write tokens:read,tokens:read").unwrap();
        assert_eq!(rw.to_stored(), "tokens:read tokens:write");
        assert!(!rw.allows(Scope::Mfa));
        assert!(Scopes::parse_list("tokens:delete").is_err());
    }
}
