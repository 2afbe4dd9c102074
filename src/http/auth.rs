//! Who is calling: the [`Authenticator`] trait, the [`Principal`] it yields, and
//! [`StaticTokens`], a ready authenticator for fixed bearer tokens.

use std::collections::BTreeSet;
use std::fmt;

use async_trait::async_trait;
use axum::http::{HeaderMap, header};

use crate::error::{BoxError, Error, Result};
use crate::model::{Configuration, NewRequest, Request, RequestType, Source};
use crate::store::Visibility;

/// An authenticated caller: a user, and the projects whose requests they may see.
///
/// A principal sees, lists and cancels the requests it submitted and every request of
/// its projects; it may submit only as itself and only into its projects.
///
/// # Examples
///
/// ```
/// use root_orchestrator::http::Principal;
///
/// let alice = Principal::new("alice", ["proj-a", "proj-b"]);
/// assert!(alice.may_use_project("proj-b"));
/// assert!(!alice.may_use_project("proj-c"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Principal {
    /// The user's id, as requests record it in `user_id`.
    pub user_id: String,
    /// Projects the user may submit to and whose requests the user may see.
    pub projects: BTreeSet<String>,
}

impl Principal {
    /// `user_id`, with access to `projects`.
    pub fn new<P: Into<String>>(
        user_id: impl Into<String>,
        projects: impl IntoIterator<Item = P>,
    ) -> Self {
        Principal {
            user_id: user_id.into(),
            projects: projects.into_iter().map(Into::into).collect(),
        }
    }

    /// Whether the principal may submit to, and see the requests of, `project_id`.
    pub fn may_use_project(&self, project_id: &str) -> bool {
        self.projects.contains(project_id)
    }

    /// Whether the principal may see (and cancel) `request`.
    pub fn can_see(&self, request: &Request) -> bool {
        request.user_id == self.user_id || self.may_use_project(&request.project_id)
    }

    /// The store-side filter for what the principal may see.
    pub fn visibility(&self) -> Visibility {
        Visibility::new(self.user_id.clone(), self.projects.iter().cloned())
    }
}

/// Why a call was not authenticated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The call carries no credentials this authenticator understands (answered 401).
    #[error("no credentials were sent; send `Authorization: Bearer <token>`")]
    MissingCredentials,
    /// Credentials were sent but are not valid (answered 401 with `invalid_token`).
    #[error("the credentials sent are not valid")]
    InvalidCredentials,
    /// More than one `Authorization` header was sent, so which one counts is ambiguous
    /// (answered 401 with `invalid_request`).
    #[error("more than one Authorization header was sent; send exactly one")]
    AmbiguousCredentials,
    /// The authenticator could not decide, for example because its identity provider is
    /// unreachable (answered 503).
    #[error("credentials could not be checked now")]
    Unavailable(#[source] BoxError),
}

/// Maps a call's headers to the [`Principal`] making it.
///
/// Implement this to plug in your identity provider (JWT validation, token
/// introspection, mTLS headers set by a proxy, ...). [`StaticTokens`] is a ready one.
///
/// # Examples
///
/// ```
/// use async_trait::async_trait;
/// use axum::http::HeaderMap;
/// use root_orchestrator::http::{AuthError, Authenticator, Principal};
///
/// /// Trusts the user named by a header that an authenticating proxy sets.
/// struct ProxyHeader;
///
/// #[async_trait]
/// impl Authenticator for ProxyHeader {
///     async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
///         let user = headers
///             .get("x-authenticated-user")
///             .and_then(|v| v.to_str().ok())
///             .ok_or(AuthError::MissingCredentials)?;
///         Ok(Principal::new(user, [format!("{user}-sandbox")]))
///     }
/// }
/// ```
#[async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// The principal making a call with these headers.
    ///
    /// # Errors
    ///
    /// [`AuthError::MissingCredentials`] or [`AuthError::InvalidCredentials`] (both
    /// answered 401), or [`AuthError::Unavailable`] (answered 503).
    async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, AuthError>;
}

/// The token of an `Authorization: Bearer <token>` header.
///
/// The scheme is matched in any case and may be followed by any ASCII whitespace (spaces
/// or tabs) before the token.
///
/// # Errors
///
/// [`AuthError::MissingCredentials`] without such a header (or with another scheme),
/// [`AuthError::AmbiguousCredentials`] when the header is given more than once,
/// [`AuthError::InvalidCredentials`] when the header is not readable text or the token
/// is empty.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(AuthError::MissingCredentials);
    };
    // Proxies and clients disagree on which of several headers wins; guessing could
    // authenticate a call as someone its sender did not mean.
    if values.next().is_some() {
        return Err(AuthError::AmbiguousCredentials);
    }
    let value = value.to_str().map_err(|_| AuthError::InvalidCredentials)?;
    let value = value.trim_matches(|c: char| c.is_ascii_whitespace());
    let (scheme, token) = value
        .split_once(|c: char| c.is_ascii_whitespace())
        .unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::MissingCredentials);
    }
    let token = token.trim_matches(|c: char| c.is_ascii_whitespace());
    if token.is_empty() {
        return Err(AuthError::InvalidCredentials);
    }
    Ok(token)
}

/// A fixed set of bearer tokens, each standing for one [`Principal`].
///
/// Meant for service-to-service calls, development and tests; tokens are compared in
/// constant time and never printed (`Debug` shows only the users).
///
/// The text form, as [`StaticTokens::parse`] and [`StaticTokens::from_env`] read it, is
/// `token=user:project,project;token=user:project`: entries separated by `;` or line
/// breaks, each a token, `=`, a user id and, after an optional `:`, that user's projects
/// separated by `,`. Blanks around each part are ignored. An entry is split at its last
/// `=`, so tokens may contain `=` (base64 padding) while user ids and projects may not.
///
/// Tokens are visible ASCII (`!` to `~`), since that is all an `Authorization` header can
/// carry. User ids and projects must be values the store accepts as `user_id` and
/// `project_id` (see [`NewRequest::validate`]): non-blank, at most 256 bytes, without
/// control or invisible formatting characters. A setting that breaks any rule is refused
/// when read, naming the entry by position and never printing its token.
///
/// # Examples
///
/// ```
/// use axum::http::{HeaderMap, HeaderValue, header};
/// use root_orchestrator::http::{Authenticator, StaticTokens};
///
/// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
/// let tokens = StaticTokens::parse("s3cret-a=alice:proj-a,proj-b; s3cret-b=bob:proj-c")?;
///
/// let mut headers = HeaderMap::new();
/// headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer s3cret-a"));
/// let alice = tokens.authenticate(&headers).await?;
/// assert_eq!(alice.user_id, "alice");
/// assert!(alice.may_use_project("proj-b"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Default)]
pub struct StaticTokens {
    tokens: Vec<(String, Principal)>,
}

impl fmt::Debug for StaticTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticTokens")
            .field(
                "users",
                &self
                    .tokens
                    .iter()
                    .map(|(_, p)| &p.user_id)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl StaticTokens {
    /// The environment variable [`from_env`](Self::from_env) reads by default.
    pub const ENV_VAR: &'static str = "ROOT_ORCHESTRATOR_TOKENS";

    /// No tokens: every call is refused until tokens are added.
    pub fn new() -> Self {
        StaticTokens::default()
    }

    /// Adds `token`, standing for `principal`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when the token is empty, has a character outside visible
    /// ASCII (`!` to `~`), or is given twice, or when the principal's user id or one of its
    /// projects is a value the store would refuse.
    pub fn with_token(mut self, token: impl Into<String>, principal: Principal) -> Result<Self> {
        let token = token.into();
        let refuse = |expected: &str| Error::InvalidConfig {
            name: "token".into(),
            value: "(hidden)".into(),
            expected: expected.into(),
        };
        // A header value is ASCII; a token with anything else could never be presented.
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(refuse(
                "a non-empty token of visible ASCII characters (`!` to `~`, no blanks)",
            ));
        }
        check_principal(&principal).map_err(|expected| Error::InvalidConfig {
            name: "principal".into(),
            value: principal.user_id.chars().take(64).collect(),
            expected,
        })?;
        if self.tokens.iter().any(|(known, _)| *known == token) {
            return Err(refuse(&format!(
                "a token not already given (again for user `{}`)",
                principal.user_id
            )));
        }
        self.tokens.push((token, principal));
        Ok(self)
    }

    /// Reads tokens in the text form described on [`StaticTokens`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the first malformed entry (by position, never by
    /// its token).
    pub fn parse(spec: &str) -> Result<Self> {
        Self::parse_named("tokens", spec)
    }

    /// Reads tokens from the environment variable `var` (such as [`Self::ENV_VAR`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming `var` when it is unset, empty or malformed.
    pub fn from_env(var: &str) -> Result<Self> {
        let spec = std::env::var(var).map_err(|_| Error::InvalidConfig {
            name: var.into(),
            value: String::new(),
            expected: "tokens such as `token1=alice:proj-a,proj-b;token2=bob:proj-c`".into(),
        })?;
        Self::parse_named(var, &spec)
    }

    fn parse_named(name: &str, spec: &str) -> Result<Self> {
        let refuse = |entry: usize, expected: &str| Error::InvalidConfig {
            name: name.into(),
            value: format!("entry {entry} (hidden: it holds a token)"),
            expected: expected.into(),
        };
        let mut tokens = StaticTokens::new();
        // Line breaks separate entries too: a multi-line setting must not fold the next
        // entry into the last project's name.
        let entries = spec
            .split([';', '\n', '\r'])
            .map(str::trim)
            .filter(|e| !e.is_empty());
        for (i, entry) in entries.enumerate() {
            let n = i + 1;
            // The last `=`: tokens may end in base64 padding, users and projects have none.
            let (token, rest) = entry
                .rsplit_once('=')
                .ok_or_else(|| refuse(n, "`token=user:project,project`"))?;
            let (user, projects) = rest.split_once(':').unwrap_or((rest, ""));
            let user = user.trim();
            if user.is_empty() {
                return Err(refuse(n, "a user id after `=`"));
            }
            let projects = projects.split(',').map(str::trim).filter(|p| !p.is_empty());
            tokens = tokens
                .with_token(token.trim(), Principal::new(user, projects))
                .map_err(|e| match e {
                    Error::InvalidConfig { expected, .. } => refuse(n, &expected),
                    other => other,
                })?;
        }
        if tokens.tokens.is_empty() {
            return Err(refuse(0, "at least one `token=user:projects` entry"));
        }
        Ok(tokens)
    }

    /// How many tokens are known.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether no token is known.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// Checks that the store would accept the principal's user id and each of its projects,
/// so that a bad setting is refused when read instead of failing every submit with 422.
/// The error names the value (shortened, escaped) and what is wrong with it.
fn check_principal(principal: &Principal) -> std::result::Result<(), String> {
    // The model's own checks, through a submission that is valid but for the value tried:
    // `validate` reports the first bad field, and everything else here is fine.
    let probe = |project_id: &str, user_id: &str| {
        let mut configuration = Configuration::new(["probe"]);
        configuration.sources.push(Source::new("probe", "probe"));
        let request_type = RequestType::new("probe")?;
        NewRequest::new(project_id, user_id, request_type, configuration).validate()
    };
    let explain = |what: &str, value: &str, err: Error| {
        let shown: String = value.chars().take(40).collect();
        let problem = match err {
            Error::InvalidRequest { problem, .. } => problem,
            other => other.to_string(),
        };
        format!("{what} the store accepts; {shown:?} {problem}")
    };
    probe("probe", &principal.user_id).map_err(|e| explain("a user id", &principal.user_id, e))?;
    for project in &principal.projects {
        probe(project, "probe").map_err(|e| explain("projects", project, e))?;
    }
    Ok(())
}

/// Compares without stopping at the first difference, so that the time taken does not
/// tell an attacker how much of a guessed token was right.
fn same_token(known: &str, given: &str) -> bool {
    let (known, given) = (known.as_bytes(), given.as_bytes());
    let mut difference = known.len() ^ given.len();
    for (i, byte) in known.iter().enumerate() {
        difference |= usize::from(byte ^ given.get(i).copied().unwrap_or(0));
    }
    difference == 0
}

#[async_trait]
impl Authenticator for StaticTokens {
    async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
        let given = bearer_token(headers)?;
        // Every token is compared, matched or not, for the same reason as in `same_token`.
        let mut found = None;
        for (token, principal) in &self.tokens {
            if same_token(token, given) && found.is_none() {
                found = Some(principal);
            }
        }
        found.cloned().ok_or(AuthError::InvalidCredentials)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_authorization(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
        headers
    }

    #[tokio::test]
    async fn tokens_map_to_their_principals() {
        let tokens = StaticTokens::parse(" t1 = alice : proj-a , proj-b ;t2=bob;;").unwrap();
        assert_eq!(tokens.len(), 2);

        let alice = tokens
            .authenticate(&with_authorization("bearer t1"))
            .await
            .unwrap();
        assert_eq!(alice, Principal::new("alice", ["proj-a", "proj-b"]));
        let bob = tokens
            .authenticate(&with_authorization("Bearer t2"))
            .await
            .unwrap();
        assert!(bob.projects.is_empty());

        for (headers, missing) in [
            (HeaderMap::new(), true),
            (with_authorization("Basic dDE6"), true),
            (with_authorization("Bearer t3"), false),
            (with_authorization("Bearer t1x"), false),
            (with_authorization("Bearer "), false),
        ] {
            let err = tokens.authenticate(&headers).await.unwrap_err();
            assert_eq!(
                matches!(err, AuthError::MissingCredentials),
                missing,
                "{headers:?}: {err}"
            );
        }
    }

    #[test]
    fn malformed_specs_are_refused_without_echoing_tokens() {
        for spec in [
            "",
            ";;",
            "no-equals-sign",
            "t1=:proj",
            "t1=a;t1=b",
            "t 1=alice",
        ] {
            let err = StaticTokens::parse(spec).unwrap_err();
            assert!(matches!(err, Error::InvalidConfig { .. }), "{spec}: {err}");
        }
        let err = StaticTokens::parse("good=alice;s3cret-token").unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert!(err.to_string().contains("entry 2"), "{err}");

        let debug = format!("{:?}", StaticTokens::parse("s3cret=alice").unwrap());
        assert!(
            !debug.contains("s3cret") && debug.contains("alice"),
            "{debug}"
        );
    }

    #[tokio::test]
    async fn a_token_ending_in_base64_padding_keeps_its_padding() {
        let tokens = StaticTokens::parse("dGVzdA===alice:p; YWI==bob").unwrap();
        let alice = tokens
            .authenticate(&with_authorization("Bearer dGVzdA=="))
            .await
            .unwrap();
        assert_eq!(alice, Principal::new("alice", ["p"]));
        let bob = tokens
            .authenticate(&with_authorization("Bearer YWI="))
            .await
            .unwrap();
        assert_eq!(bob.user_id, "bob");
        assert!(
            tokens
                .authenticate(&with_authorization("Bearer dGVzdA"))
                .await
                .is_err()
        );
    }

    #[test]
    fn line_breaks_separate_entries_like_semicolons() {
        let tokens = StaticTokens::parse("t1=alice:p1,p2\r\nt2=bob:p3\n\nt3=carol").unwrap();
        let principals: Vec<_> = tokens.tokens.iter().map(|(_, p)| p.clone()).collect();
        assert_eq!(
            principals,
            [
                Principal::new("alice", ["p1", "p2"]),
                Principal::new("bob", ["p3"]),
                Principal::new("carol", Vec::<String>::new()),
            ]
        );
    }

    #[test]
    fn tokens_outside_visible_ascii_are_refused_without_echoing_them() {
        for spec in [
            "ok=a;tökén=alice",
            "ok=a;bell\u{7}x=alice",
            "ok=a;nb\u{a0}sp=alice",
        ] {
            let err = StaticTokens::parse(spec).unwrap_err().to_string();
            assert!(err.contains("entry 2"), "{spec}: {err}");
            assert!(err.contains("visible ASCII"), "{spec}: {err}");
            for secret in ["tök", "bell", "nb"] {
                assert!(!err.contains(secret), "{err}");
            }
        }
        let err = StaticTokens::new()
            .with_token("naïve", Principal::new("alice", ["p"]))
            .unwrap_err();
        assert!(err.to_string().contains("visible ASCII"), "{err}");
    }

    #[test]
    fn users_and_projects_the_store_would_refuse_are_refused_when_read() {
        let long = "u".repeat(257);
        let cases = [
            (
                format!("s3cret=ok;s3cret2={long}:p"),
                "a user id",
                "257 bytes",
            ),
            (
                "s3cret=ok;s3cret2=al\u{7}ice:p".to_owned(),
                "a user id",
                "control",
            ),
            (
                "s3cret=ok;s3cret2=alice:p1,p\u{200B}2".to_owned(),
                "projects",
                "U+200B",
            ),
            (
                format!("s3cret=ok;s3cret2=alice:p1,{}", "p".repeat(300)),
                "projects",
                "300 bytes",
            ),
        ];
        for (spec, what, why) in cases {
            let err = StaticTokens::parse(&spec).unwrap_err().to_string();
            assert!(err.contains("entry 2"), "{err}");
            assert!(err.contains(what) && err.contains(why), "{err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
        // At the edge: 256 bytes is still accepted, as the store accepts it.
        let edge = format!("t={}:{}", "u".repeat(256), "p".repeat(256));
        assert_eq!(StaticTokens::parse(&edge).unwrap().len(), 1);

        let err = StaticTokens::new()
            .with_token("tok", Principal::new(" ", ["p"]))
            .unwrap_err();
        assert!(err.to_string().contains("blank"), "{err}");
    }

    #[test]
    fn the_scheme_may_be_followed_by_a_tab_and_two_headers_are_ambiguous() {
        for value in ["Bearer\tt1", "bearer  t1 ", " Bearer\t \tt1\t"] {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            assert_eq!(bearer_token(&headers).unwrap(), "t1", "{value:?}");
        }

        // Even the same token twice: which header counts is still a guess.
        for second in ["Bearer t2", "Bearer t1"] {
            let mut headers = with_authorization("Bearer t1");
            headers.append(header::AUTHORIZATION, HeaderValue::from_static(second));
            assert!(matches!(
                bearer_token(&headers),
                Err(AuthError::AmbiguousCredentials)
            ));
        }
    }

    #[test]
    fn token_comparison_needs_every_byte() {
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd"));
        assert!(!same_token("abc", "ab"));
        assert!(!same_token("abc", "abc\0"));
        assert!(!same_token("", "a"));
    }
}
