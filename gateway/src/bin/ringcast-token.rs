//! `ringcast-token`: mints a token a gateway accepts, for operators, scripts and tests.
//!
//! ```text
//! ringcast-token --secret "$SECRET" --sub 42 --subscribe 'room:*' --subscribe 'user:{sub}' --publish 'room:*'
//! ringcast-token --secret "$SECRET" --sub 42 --topic vip:1 --join-publish   # a join token for vip:1
//! ringcast-token --key private.pem --alg ES256 --kid k2 --sub 42 --subscribe 'room:*'
//! ```
//! Your backend mints them the same way (README, Security); this is the same format.

use clap::Parser;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

/// Mints a ringcast token (JWT). A connection token names the user and the topics it may
/// subscribe and publish to; with --topic, a join token for one topic.
#[derive(Debug, Parser)]
#[command(name = "ringcast-token", version, about)]
struct Args {
    /// HS256 secret (as in GATEWAY_JWT_SECRETS).
    #[arg(
        long,
        env = "RINGCAST_TOKEN_SECRET",
        conflicts_with = "key",
        hide_env_values = true
    )]
    secret: Option<String>,
    /// Private key (PEM) for RS256 or ES256.
    #[arg(long)]
    key: Option<std::path::PathBuf>,
    /// Algorithm of --key.
    #[arg(long, value_enum, default_value_t = Alg::Es256)]
    alg: Alg,
    /// Key id put in the header (`kid`), as the gateway's key list names the key.
    #[arg(long)]
    kid: Option<String>,
    /// The user.
    #[arg(long)]
    sub: String,
    /// Seconds the token is valid.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
    /// Topic patterns the holder may join (`room:*`, exact names, `user:{sub}`); repeatable.
    #[arg(long)]
    subscribe: Vec<String>,
    /// Topic patterns the holder may publish to; repeatable.
    #[arg(long)]
    publish: Vec<String>,
    /// Mint a join token for this topic instead (sent in `phx_join` params as `token`).
    #[arg(long, conflicts_with_all = ["subscribe", "publish"])]
    topic: Option<String>,
    /// With --topic: the holder may publish to it too.
    #[arg(long, requires = "topic")]
    join_publish: bool,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum Alg {
    Rs256,
    Es256,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match mint(&args) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ringcast-token: {e}");
            ExitCode::FAILURE
        }
    }
}

fn mint(args: &Args) -> Result<String, String> {
    let (algorithm, key) = match (&args.secret, &args.key) {
        (Some(secret), _) => (
            Algorithm::HS256,
            EncodingKey::from_secret(secret.as_bytes()),
        ),
        (None, Some(path)) => {
            let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let (alg, key) = match args.alg {
                Alg::Rs256 => (Algorithm::RS256, EncodingKey::from_rsa_pem(&pem)),
                Alg::Es256 => (Algorithm::ES256, EncodingKey::from_ec_pem(&pem)),
            };
            (alg, key.map_err(|e| format!("{}: {e}", path.display()))?)
        }
        (None, None) => return Err("give --secret (HS256) or --key (RS256/ES256)".into()),
    };
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs()
        + args.ttl;
    let claims = match &args.topic {
        Some(topic) => {
            json!({"sub": args.sub, "exp": exp, "topic": topic, "publish": args.join_publish})
        }
        None => {
            json!({"sub": args.sub, "exp": exp, "subscribe": args.subscribe, "publish": args.publish})
        }
    };
    let mut header = Header::new(algorithm);
    header.kid = args.kid.clone();
    jsonwebtoken::encode(&header, &claims, &key).map_err(|e| e.to_string())
}
