//! Where the sandbox may push webhooks. A public sandbox that POSTs to any URL a caller names
//! is a server-side request forgery tool: it would reach its own loopback services, the cloud
//! metadata endpoint (169.254.169.254) or the private network it runs in. So, unless the
//! sandbox is started with `--allow-private-webhooks` ([`crate::SandboxConfig`]):
//!
//! - a webhook URL is checked when it is registered, after resolving its host, and refused
//!   (422 `badParam`, with the reason) if the host does not resolve or any address it
//!   resolves to is not public;
//! - every push resolves the host again through [`PublicAddressResolver`], which refuses the
//!   same addresses and hands the connection exactly the addresses it checked (no second
//!   lookup an attacker's DNS could answer differently), and an IP-literal host (never
//!   resolved) is checked before the request;
//! - pushes follow no redirects and use no proxy, so a public URL cannot bounce elsewhere.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// How long a webhook host may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an address may not receive webhooks, or `None` when it is public.
pub(crate) fn refusal_reason(address: IpAddr) -> Option<&'static str> {
    match address {
        IpAddr::V4(v4) => ipv4_refusal(v4),
        IpAddr::V6(v6) => ipv6_refusal(v6),
    }
}

fn ipv4_refusal(address: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = address.octets();
    if address.is_unspecified() || a == 0 {
        Some("an unspecified (0.0.0.0/8) address")
    } else if address.is_loopback() {
        Some("a loopback address")
    } else if address.is_private() {
        Some("a private (RFC 1918) address")
    } else if address.is_link_local() {
        Some("a link-local address")
    } else if a == 100 && (64..128).contains(&b) {
        Some("a shared (CGNAT, 100.64.0.0/10) address")
    } else if address.is_broadcast() {
        Some("the broadcast address")
    } else if address.is_multicast() {
        Some("a multicast address")
    } else if a >= 240 {
        Some("a reserved (240.0.0.0/4) address")
    } else {
        None
    }
}

fn ipv6_refusal(address: Ipv6Addr) -> Option<&'static str> {
    if address.is_loopback() {
        return Some("a loopback address");
    }
    if address.is_unspecified() {
        return Some("an unspecified address");
    }
    let segments = address.segments();
    // An IPv4 address in IPv6 clothing is judged as the IPv4 address it reaches:
    // IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d)
    // and the NAT64 well-known prefix (64:ff9b::a.b.c.d).
    let [_, _, _, _, _, _, high, low] = segments;
    let embedded = Ipv4Addr::from((u32::from(high) << 16) | u32::from(low));
    let is_mapped = segments[..5] == [0; 5] && segments[5] == 0xffff;
    let is_compatible = segments[..6] == [0; 6];
    let is_nat64 = segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    if is_mapped || is_compatible || is_nat64 {
        return ipv4_refusal(embedded);
    }
    if address.is_multicast() {
        Some("a multicast address")
    } else if segments[0] & 0xfe00 == 0xfc00 {
        Some("a unique local (fc00::/7) address")
    } else if segments[0] & 0xffc0 == 0xfe80 {
        Some("a link-local address")
    } else {
        None
    }
}

/// A webhook target that may not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RefusedTarget(String);

impl RefusedTarget {
    const ADVICE: &'static str = "the sandbox pushes only to public addresses unless it is started with --allow-private-webhooks";

    fn literal(host: &str, reason: &str) -> RefusedTarget {
        RefusedTarget(format!("webhook host {host} is {reason}; {}", Self::ADVICE))
    }

    fn resolved(host: &str, address: IpAddr, reason: &str) -> RefusedTarget {
        RefusedTarget(format!(
            "webhook host {host} resolves to {address}, {reason}; {}",
            Self::ADVICE
        ))
    }
}

impl fmt::Display for RefusedTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RefusedTarget {}

/// Checks every address of `host`; `Ok` with them all when each is public.
fn check_addresses(
    host: &str,
    addresses: Vec<SocketAddr>,
) -> Result<Vec<SocketAddr>, RefusedTarget> {
    if addresses.is_empty() {
        return Err(RefusedTarget(format!(
            "webhook host {host} does not resolve to any address"
        )));
    }
    for address in &addresses {
        if let Some(reason) = refusal_reason(address.ip()) {
            return Err(RefusedTarget::resolved(host, address.ip(), reason));
        }
    }
    Ok(addresses)
}

/// Resolves `host` and checks every address it resolves to.
async fn resolve_checked(host: &str, port: u16) -> Result<Vec<SocketAddr>, RefusedTarget> {
    let lookup = tokio::net::lookup_host((host, port));
    let addresses = match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
        Ok(Ok(addresses)) => addresses.collect(),
        Ok(Err(_)) | Err(_) => {
            return Err(RefusedTarget(format!(
                "webhook host {host} does not resolve"
            )));
        }
    };
    check_addresses(host, addresses)
}

/// The host of an IP-literal URL, which reqwest connects to without asking any resolver.
fn literal_address(url: &Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    let unbracketed = host
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(host);
    unbracketed.parse().ok()
}

/// Checks an IP-literal host; `None` for a name.
fn check_literal(url: &Url) -> Option<Result<(), RefusedTarget>> {
    let address = literal_address(url)?;
    Some(match refusal_reason(address) {
        Some(reason) => Err(RefusedTarget::literal(
            url.host_str().unwrap_or_default(),
            reason,
        )),
        None => Ok(()),
    })
}

/// Checks a webhook URL before it is stored: an IP literal directly, a name after resolving it.
pub(crate) async fn check_registration(url: &Url) -> Result<(), RefusedTarget> {
    if let Some(checked) = check_literal(url) {
        return checked;
    }
    let host = url.host_str().unwrap_or_default();
    let port = url.port_or_known_default().unwrap_or(80);
    resolve_checked(host, port).await.map(|_| ())
}

/// Checks an IP-literal URL before a push (named hosts are checked by the resolver).
pub(crate) fn check_literal_before_push(url: &Url) -> Result<(), RefusedTarget> {
    check_literal(url).unwrap_or(Ok(()))
}

/// The DNS resolver of the push client: resolves a name, refuses it when any of its addresses
/// is not public, and otherwise returns exactly the addresses it checked for the connection.
#[derive(Debug, Default)]
pub(crate) struct PublicAddressResolver;

impl Resolve for PublicAddressResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // Port 0: reqwest puts the URL's port (or the scheme's) in place.
            let addresses = resolve_checked(&host, 0).await?;
            Ok(Box::new(addresses.into_iter()) as Addrs)
        })
    }
}

/// Whether a failed push was refused by these rules (somewhere in the error's chain), rather
/// than failing in a way that a retry might fix.
pub(crate) fn is_refusal(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if error.is::<RefusedTarget>() {
            return true;
        }
        current = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_may_receive_webhooks() {
        let table: &[(&str, bool)] = &[
            ("93.184.215.14", true),
            ("8.8.8.8", true),
            ("100.63.255.255", true),
            ("100.128.0.1", true),
            ("172.32.0.1", true),
            ("2606:4700:4700::1111", true),
            ("127.0.0.1", false),
            ("127.255.255.254", false),
            ("10.1.2.3", false),
            ("172.16.0.1", false),
            ("172.31.255.255", false),
            ("192.168.1.1", false),
            ("169.254.169.254", false),
            ("100.64.0.1", false),
            ("100.127.255.255", false),
            ("0.0.0.0", false),
            ("0.1.2.3", false),
            ("255.255.255.255", false),
            ("224.0.0.1", false),
            ("240.0.0.1", false),
            ("::", false),
            ("::1", false),
            ("fc00::1", false),
            ("fd12:3456::1", false),
            ("fe80::1", false),
            ("ff02::1", false),
            ("::ffff:127.0.0.1", false),
            ("::ffff:10.0.0.1", false),
            ("::ffff:169.254.169.254", false),
            ("::ffff:8.8.8.8", true),
            ("::127.0.0.1", false),
            ("64:ff9b::192.168.0.1", false),
            ("64:ff9b::8.8.8.8", true),
        ];
        for (address, public) in table {
            let parsed: IpAddr = address.parse().unwrap();
            assert_eq!(
                refusal_reason(parsed).is_none(),
                *public,
                "{address}: {:?}",
                refusal_reason(parsed)
            );
        }
    }

    #[tokio::test]
    async fn the_push_resolver_refuses_a_name_that_resolves_to_loopback() {
        let name: Name = "localhost".parse().unwrap();
        let error = match PublicAddressResolver.resolve(name).await {
            Ok(addresses) => panic!("resolved to {:?}", addresses.collect::<Vec<_>>()),
            Err(error) => error,
        };
        assert!(is_refusal(error.as_ref()), "{error}");
        assert!(error.to_string().contains("loopback"), "{error}");
    }

    #[tokio::test]
    async fn a_push_client_with_the_resolver_never_connects_to_loopback_and_says_why() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .dns_resolver(std::sync::Arc::new(PublicAddressResolver))
            .no_proxy()
            .build()
            .unwrap();
        let error = client
            .post("http://localhost:9/hook")
            .send()
            .await
            .unwrap_err();
        assert!(is_refusal(&error), "{error:?}");
    }

    #[tokio::test]
    async fn a_registration_names_the_address_and_the_reason() {
        let refused = check_registration(&Url::parse("http://localhost:9/hook").unwrap())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("localhost resolves to 127.0.0.1")
                || refused.contains("localhost resolves to ::1"),
            "{refused}"
        );
        assert!(refused.contains("loopback"), "{refused}");
        assert!(refused.contains("--allow-private-webhooks"), "{refused}");
        let literal = check_registration(&Url::parse("http://[::ffff:10.0.0.1]/hook").unwrap())
            .await
            .unwrap_err()
            .to_string();
        assert!(literal.contains("private"), "{literal}");
        check_registration(&Url::parse("https://93.184.215.14/hook").unwrap())
            .await
            .expect("a public literal needs no lookup");
    }
}
