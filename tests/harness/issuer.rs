//! A local OpenID Connect issuer for the gateway side of identity: discovery
//! and a JWKS endpoint served on loopback, with RSA keys the test controls, so
//! tests can sign good tokens and forge bad ones.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rsa::RsaPrivateKey;
use rsa::pkcs1v15::SigningKey as RsaSigner;
use rsa::signature::{SignatureEncoding, Signer};
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};
use sha2::Sha256;

/// An RSA signing key with its key id.
#[derive(Clone)]
pub struct Key {
    pub kid: String,
    private: RsaPrivateKey,
}

impl Key {
    fn jwk(&self) -> Value {
        let public = self.private.to_public_key();
        json!({
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
            "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
            "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
        })
    }

    /// A compact JWS with this key (RS256) over `header` and `claims`.
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signer = RsaSigner::<Sha256>::new(self.private.clone());
        let signature = signer.sign(signing_input.as_bytes()).to_bytes();
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// A token with the usual header (`alg` RS256, this key's `kid`).
    pub fn token(&self, claims: &Value) -> String {
        self.sign(&json!({"alg": "RS256", "typ": "JWT", "kid": self.kid}), claims)
    }
}

/// Keys are costly to generate; the tests of one binary share a few.
pub fn key(index: usize) -> Key {
    static KEYS: OnceLock<Vec<RsaPrivateKey>> = OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        let mut rng = rand::rng();
        (0..3)
            .map(|_| RsaPrivateKey::new(&mut rsa_rng::Compat(&mut rng), 2048).expect("RSA key"))
            .collect()
    });
    Key {
        kid: format!("key-{index}"),
        private: keys[index].clone(),
    }
}

/// rsa 0.9 takes rand_core 0.6 RNGs; the workspace uses rand 0.9.
mod rsa_rng {
    pub struct Compat<'a, R>(pub &'a mut R);

    impl<R: rand::RngCore> rsa::rand_core::RngCore for Compat<'_, R> {
        fn next_u32(&mut self) -> u32 {
            self.0.next_u32()
        }
        fn next_u64(&mut self) -> u64 {
            self.0.next_u64()
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            self.0.fill_bytes(dest)
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rsa::rand_core::Error> {
            self.0.fill_bytes(dest);
            Ok(())
        }
    }

    impl<R: rand::CryptoRng> rsa::rand_core::CryptoRng for Compat<'_, R> {}
}

struct IssuerState {
    url: String,
    published: Mutex<Vec<Key>>,
    jwks_fetches: AtomicUsize,
}

/// A running issuer.
pub struct TestIssuer {
    pub url: String,
    state: Arc<IssuerState>,
    task: tokio::task::JoinHandle<()>,
}

impl TestIssuer {
    /// Starts an issuer on loopback publishing `key(0)`.
    pub async fn start() -> TestIssuer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("issuer bind");
        let addr: SocketAddr = listener.local_addr().expect("issuer addr");
        let url = format!("http://{addr}");
        let state = Arc::new(IssuerState {
            url: url.clone(),
            published: Mutex::new(vec![key(0)]),
            jwks_fetches: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("issuer serve");
        });
        TestIssuer { url, state, task }
    }

    /// Publishes another key (a rotation).
    pub fn publish(&self, key: Key) {
        self.state.published.lock().unwrap().push(key);
    }

    /// How many times the key set was fetched.
    pub fn jwks_fetches(&self) -> usize {
        self.state.jwks_fetches.load(Ordering::SeqCst)
    }

    /// The `[identity.oidc]` section for a gateway trusting this issuer.
    pub fn config(&self, extra: &str) -> String {
        format!(
            "[identity.oidc]\nissuer = \"{}\"\naudience = \"sluice-test\"\nmin_refresh_interval = \"0s\"\n{extra}",
            self.url
        )
    }

    /// Valid claims for a person in `groups`, expiring in an hour.
    pub fn claims(&self, email: &str, groups: &[&str]) -> Value {
        let now = now();
        json!({
            "iss": self.url,
            "aud": "sluice-test",
            "sub": format!("sub-{email}"),
            "email": email,
            "groups": groups,
            "iat": now,
            "exp": now + 3600,
        })
    }
}

impl Drop for TestIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

async fn discovery(State(state): State<Arc<IssuerState>>) -> Json<Value> {
    Json(json!({
        "issuer": state.url,
        "authorization_endpoint": format!("{}/auth", state.url),
        "token_endpoint": format!("{}/token", state.url),
        "jwks_uri": format!("{}/jwks", state.url),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }))
}

async fn jwks(State(state): State<Arc<IssuerState>>) -> Json<Value> {
    state.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    let keys: Vec<Value> = state.published.lock().unwrap().iter().map(Key::jwk).collect();
    Json(json!({ "keys": keys }))
}
