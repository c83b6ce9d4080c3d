//! The PROXY protocol (HAProxy's, versions 1 and 2): the header an L4 load balancer
//! puts in front of a client connection to say whose connection it is.
//!
//! This module owns the strict parser a listener uses ([`read_header`], built on
//! [`parse`]) and the encoder ([`encode_v1`], [`encode_v2`]) TCP clusters use towards
//! backends (`send_proxy`). The parser reads exactly the header's bytes from the socket and not
//! one more, so the client's first bytes (a TLS ClientHello, a request line) stay in the
//! socket for whoever reads next. It never guesses: anything that is not a complete,
//! well-formed header of an accepted version is an error, and the listener closes the
//! connection. It must never panic on any input, and never buffer more than
//! [`V2_MAX_LEN`] bytes for one header.
//!
//! Specification: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest v1 header, CRLF included (the specification's bound).
pub const V1_MAX_LEN: usize = 107;
/// The 12 bytes every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Largest v2 header keyway accepts, fixed part included: addresses and TLVs a balancer
/// sends (TLS facts, a VPC endpoint id, a unique id) fit many times over; anything
/// longer is refused rather than buffered.
pub const V2_MAX_LEN: usize = 16 + 2048;

pub use crate::config::Accept;

/// What a header says about the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// A proxied connection: the client's address and the address it connected to.
    Proxy {
        /// The original client.
        source: SocketAddr,
        /// The address the client connected to (the balancer's front).
        destination: SocketAddr,
    },
    /// v2 LOCAL: the balancer's own connection (a health check). The socket's peer
    /// address stands.
    Local,
    /// v1 `UNKNOWN`, or v2 PROXY with an address family keyway does not take addresses
    /// from (AF_UNSPEC, AF_UNIX): the socket's peer address stands.
    Unknown,
}

impl Header {
    /// The client address to use for a connection whose socket peer is `peer`.
    pub fn client(&self, peer: SocketAddr) -> SocketAddr {
        match self {
            Header::Proxy { source, .. } => *source,
            Header::Local | Header::Unknown => peer,
        }
    }
}

/// Why a header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The bytes are no PROXY header of a version the listener accepts.
    #[error("the connection does not start with a PROXY protocol {0} header")]
    NotProxy(&'static str),
    /// A v1 header without CRLF within 107 bytes.
    #[error("PROXY v1 header has no CRLF within 107 bytes")]
    V1TooLong,
    /// A v1 header that is not `PROXY TCP4|TCP6|UNKNOWN ...`.
    #[error("malformed PROXY v1 header: {0}")]
    V1Malformed(&'static str),
    /// A v2 header with a version or command keyway does not know.
    #[error("PROXY v2 header has version/command byte {0:#04x}")]
    V2VersionCommand(u8),
    /// A v2 header with an address family or transport keyway does not accept.
    #[error("PROXY v2 header has family/transport byte {0:#04x} (only TCP over IPv4/IPv6, UNIX or UNSPEC)")]
    V2Family(u8),
    /// A v2 header whose declared length is too short for its addresses or TLVs.
    #[error("PROXY v2 header is inconsistent: {0}")]
    V2Malformed(&'static str),
    /// A v2 header declaring more than [`V2_MAX_LEN`] bytes.
    #[error("PROXY v2 header declares {0} bytes; at most {V2_MAX_LEN} are accepted")]
    V2TooLong(usize),
    /// The client did not send a whole header within the listener's header_read_timeout.
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    /// The socket failed or closed before the header was complete.
    #[error("connection closed or failed while reading the PROXY header: {0}")]
    Io(String),
}

/// The outcome of [`parse`] on the bytes read so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A complete header of this many bytes.
    Done(Header, usize),
    /// Not decided yet: at least this many more bytes are needed.
    Need(usize),
}

// === parse ===

/// Parses a header at the start of `buf` for a listener accepting `accept`. Never reads
/// past the header: [`Parsed::Need`] says how many more bytes are needed at least, and
/// asking for exactly that many never consumes a byte beyond the header.
pub fn parse(buf: &[u8], accept: Accept) -> Result<Parsed, Error> {
    let (v1, v2) = match accept {
        Accept::Off => return Ok(Parsed::Done(Header::Unknown, 0)),
        Accept::V1 => (true, false),
        Accept::V2 => (false, true),
        Accept::V1OrV2 => (true, true),
    };
    let wanted = match accept {
        Accept::V1 => "v1",
        Accept::V2 => "v2",
        _ => "v1 or v2",
    };
    if buf.is_empty() {
        return Ok(Parsed::Need(1));
    }
    let n = buf.len().min(V2_SIGNATURE.len());
    if v2 && buf[..n] == V2_SIGNATURE[..n] {
        if n < V2_SIGNATURE.len() {
            return Ok(Parsed::Need(V2_SIGNATURE.len() - n));
        }
        return parse_v2(buf);
    }
    let n = buf.len().min(6);
    if v1 && buf[..n] == b"PROXY "[..n] {
        return parse_v1(buf);
    }
    Err(Error::NotProxy(wanted))
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, Error> {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(cr) = window.windows(2).position(|w| w == b"\r\n") else {
        // A lone CR or LF before the end is malformed; otherwise read on, byte by byte.
        if window.contains(&b'\n') || window[..window.len().saturating_sub(1)].contains(&b'\r') {
            return Err(Error::V1Malformed("stray CR or LF"));
        }
        if buf.len() >= V1_MAX_LEN {
            return Err(Error::V1TooLong);
        }
        return Ok(Parsed::Need(1));
    };
    let line = &buf[..cr];
    let len = cr + 2;
    let text = std::str::from_utf8(line).map_err(|_| Error::V1Malformed("not ASCII"))?;
    if !text.is_ascii() || text.contains('\r') || text.contains('\n') {
        return Err(Error::V1Malformed("not ASCII"));
    }
    let mut parts = text.split(' ');
    if parts.next() != Some("PROXY") {
        return Err(Error::V1Malformed("does not start with `PROXY `"));
    }
    let family = parts.next().ok_or(Error::V1Malformed("no protocol"))?;
    let v6 = match family {
        // "the receiver must ignore anything presented before the CRLF"
        "UNKNOWN" => return Ok(Parsed::Done(Header::Unknown, len)),
        "TCP4" => false,
        "TCP6" => true,
        _ => return Err(Error::V1Malformed("protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(Error::V1Malformed(
            "expected four fields after the protocol, one space apart",
        ));
    };
    let ip = |s: &str| -> Result<IpAddr, Error> {
        if v6 {
            s.parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| Error::V1Malformed("bad IPv6 address"))
        } else {
            s.parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|_| Error::V1Malformed("bad IPv4 address"))
        }
    };
    let port = |s: &str| -> Result<u16, Error> {
        let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
        if !digits || (s.len() > 1 && s.starts_with('0')) {
            return Err(Error::V1Malformed("bad port"));
        }
        s.parse().map_err(|_| Error::V1Malformed("bad port"))
    };
    Ok(Parsed::Done(
        Header::Proxy {
            source: SocketAddr::new(ip(src)?, port(sport)?),
            destination: SocketAddr::new(ip(dst)?, port(dport)?),
        },
        len,
    ))
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, Error> {
    if buf.len() < 16 {
        return Ok(Parsed::Need(16 - buf.len()));
    }
    let ver_cmd = buf[12];
    let fam = buf[13];
    let declared = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let total = 16 + declared;
    if total > V2_MAX_LEN {
        return Err(Error::V2TooLong(total));
    }
    let local = match ver_cmd {
        0x20 => true,
        0x21 => false,
        other => return Err(Error::V2VersionCommand(other)),
    };
    let addr_len = match fam {
        0x00 => 0,
        0x11 => 12,
        0x21 => 36,
        0x31 => 216,
        other => return Err(Error::V2Family(other)),
    };
    if buf.len() < total {
        return Ok(Parsed::Need(total - buf.len()));
    }
    let body = &buf[16..total];
    if body.len() < addr_len {
        return Err(Error::V2Malformed(
            "declared length shorter than the addresses",
        ));
    }
    // TLVs: type (1), length (2), value; they must tile the rest exactly.
    let mut tlvs = &body[addr_len..];
    while !tlvs.is_empty() {
        if tlvs.len() < 3 {
            return Err(Error::V2Malformed("truncated TLV"));
        }
        let len = usize::from(u16::from_be_bytes([tlvs[1], tlvs[2]]));
        if tlvs.len() < 3 + len {
            return Err(Error::V2Malformed("TLV longer than the header"));
        }
        tlvs = &tlvs[3 + len..];
    }
    if local {
        // "the receiver must accept this connection as valid and must use the real
        // connection endpoints and discard the protocol block including the family"
        return Ok(Parsed::Done(Header::Local, total));
    }
    let header = match fam {
        0x11 => {
            let ip = |o: usize| Ipv4Addr::new(body[o], body[o + 1], body[o + 2], body[o + 3]);
            Header::Proxy {
                source: SocketAddr::new(ip(0).into(), u16::from_be_bytes([body[8], body[9]])),
                destination: SocketAddr::new(
                    ip(4).into(),
                    u16::from_be_bytes([body[10], body[11]]),
                ),
            }
        }
        0x21 => {
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&body[o..o + 16]);
                Ipv6Addr::from(b)
            };
            Header::Proxy {
                source: SocketAddr::new(ip(0).into(), u16::from_be_bytes([body[32], body[33]])),
                destination: SocketAddr::new(
                    ip(16).into(),
                    u16::from_be_bytes([body[34], body[35]]),
                ),
            }
        }
        _ => Header::Unknown,
    };
    Ok(Parsed::Done(header, total))
}

// === read from a socket ===

/// Reads one header from `io`, exactly its bytes, within `timeout`. With
/// [`Accept::Off`] reads nothing and returns [`Header::Unknown`].
pub async fn read_header<R>(io: &mut R, accept: Accept, timeout: Duration) -> Result<Header, Error>
where
    R: AsyncRead + Unpin,
{
    if accept == Accept::Off {
        return Ok(Header::Unknown);
    }
    let read = async {
        let mut buf = Vec::with_capacity(V1_MAX_LEN);
        loop {
            match parse(&buf, accept)? {
                Parsed::Done(header, len) => {
                    debug_assert_eq!(len, buf.len(), "read past the header");
                    return Ok(header);
                }
                Parsed::Need(n) => {
                    let start = buf.len();
                    buf.resize(start + n, 0);
                    io.read_exact(&mut buf[start..])
                        .await
                        .map_err(|e| Error::Io(e.to_string()))?;
                }
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| Error::Timeout(timeout))?
}

// === encode ===

/// `PROXY TCP4|TCP6 ...\r\n`; `PROXY UNKNOWN\r\n` for LOCAL and UNKNOWN. A v4/v6 mixed
/// pair is sent as TCP6 with the IPv4 address mapped.
pub fn encode_v1(header: &Header) -> Vec<u8> {
    match header {
        Header::Proxy {
            source,
            destination,
        } => {
            let (family, s, d) = match (source.ip(), destination.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => ("TCP4", s.to_string(), d.to_string()),
                (s, d) => ("TCP6", v6(s).to_string(), v6(d).to_string()),
            };
            format!(
                "PROXY {family} {s} {d} {} {}\r\n",
                source.port(),
                destination.port()
            )
            .into_bytes()
        }
        Header::Local | Header::Unknown => b"PROXY UNKNOWN\r\n".to_vec(),
    }
}

/// The binary header: PROXY over TCP/IPv4 or TCP/IPv6 (a mixed pair as IPv6, the IPv4
/// address mapped), LOCAL, or PROXY with AF_UNSPEC for [`Header::Unknown`]. No TLVs.
pub fn encode_v2(header: &Header) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    match header {
        Header::Proxy {
            source,
            destination,
        } => {
            out.push(0x21);
            match (source.ip(), destination.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.push(0x11);
                    out.extend_from_slice(&12u16.to_be_bytes());
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    out.push(0x21);
                    out.extend_from_slice(&36u16.to_be_bytes());
                    out.extend_from_slice(&v6(s).octets());
                    out.extend_from_slice(&v6(d).octets());
                }
            }
            out.extend_from_slice(&source.port().to_be_bytes());
            out.extend_from_slice(&destination.port().to_be_bytes());
        }
        Header::Local => out.extend_from_slice(&[0x20, 0x00, 0, 0]),
        Header::Unknown => out.extend_from_slice(&[0x21, 0x00, 0, 0]),
    }
    out
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

// === tests ===

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn done(buf: &[u8], accept: Accept) -> Header {
        match parse(buf, accept) {
            Ok(Parsed::Done(h, len)) => {
                assert_eq!(len, buf.len(), "consumed length");
                h
            }
            other => panic!("{other:?} for {:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_tcp4_tcp6_unknown() {
        assert_eq!(
            done(b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 443\r\n", Accept::V1),
            Header::Proxy {
                source: addr("192.0.2.7:51234"),
                destination: addr("10.0.0.1:443"),
            }
        );
        assert_eq!(
            done(b"PROXY TCP6 2001:db8::7 ::1 65535 0\r\n", Accept::V1OrV2),
            Header::Proxy {
                source: addr("[2001:db8::7]:65535"),
                destination: addr("[::1]:0"),
            }
        );
        assert_eq!(done(b"PROXY UNKNOWN\r\n", Accept::V1), Header::Unknown);
        assert_eq!(
            done(b"PROXY UNKNOWN whatever follows\r\n", Accept::V1),
            Header::Unknown
        );
    }

    #[test]
    fn v1_is_strict() {
        for bad in [
            &b"PROXY TCP4 192.0.2.7 10.0.0.1 51234\r\n"[..],
            b"PROXY TCP4  192.0.2.7 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2 \r\n",
            b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n",
            b"PROXY TCP6 192.0.2.7 ::1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 01 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 -1 2\r\n",
            b"PROXY TCP4 192.0.2.07 10.0.0.1 1 2\r\n",
            b"PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2\n",
            b"PROXY TCP4 192.0.2.7\r10.0.0.1 1 2\r\n",
            b"GET / HTTP/1.1\r\n",
        ] {
            assert!(
                parse(bad, Accept::V1).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(bad)
            );
        }
        // 107 bytes without CRLF: refused, not read further.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX_LEN, b'x');
        assert_eq!(parse(&long, Accept::V1), Err(Error::V1TooLong));
        long.truncate(V1_MAX_LEN - 1);
        assert_eq!(parse(&long, Accept::V1), Ok(Parsed::Need(1)));
    }

    #[test]
    fn v1_never_asks_past_the_crlf() {
        let h = b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 443\r\n";
        for n in 0..h.len() {
            assert_eq!(
                parse(&h[..n], Accept::V1OrV2),
                Ok(Parsed::Need(1)),
                "at {n}"
            );
        }
    }

    #[test]
    fn v2_inet_inet6_local_unspec_and_tlvs() {
        let h = Header::Proxy {
            source: addr("192.0.2.7:51234"),
            destination: addr("10.0.0.1:443"),
        };
        let mut bytes = encode_v2(&h);
        assert_eq!(done(&bytes, Accept::V2), h);
        // With two TLVs (skipped), declared length adjusted.
        bytes.extend_from_slice(&[0x04, 0x00, 0x02, b'i', b'd', 0x01, 0x00, 0x00]);
        bytes[15] += 8;
        assert_eq!(done(&bytes, Accept::V1OrV2), h);
        // A TLV that runs past the declared end is refused.
        let mut bad = bytes.clone();
        bad[15] -= 1;
        bad.pop();
        assert!(parse(&bad, Accept::V2).is_err());

        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x11, 0x00, 0x0c]);
        local.extend_from_slice(&[1; 12]);
        assert_eq!(done(&local, Accept::V2), Header::Local);
        assert_eq!(
            done(&encode_v2(&Header::Unknown), Accept::V2),
            Header::Unknown
        );
        let v6 = Header::Proxy {
            source: addr("[2001:db8::7]:1"),
            destination: addr("[::1]:2"),
        };
        assert_eq!(done(&encode_v2(&v6), Accept::V2), v6);
    }

    #[test]
    fn v2_is_strict() {
        let good = encode_v2(&Header::Proxy {
            source: addr("192.0.2.7:1"),
            destination: addr("10.0.0.1:2"),
        });
        let with = |i: usize, b: u8| {
            let mut v = good.clone();
            v[i] = b;
            v
        };
        assert_eq!(
            parse(&with(12, 0x11), Accept::V2),
            Err(Error::V2VersionCommand(0x11))
        );
        assert_eq!(
            parse(&with(12, 0x22), Accept::V2),
            Err(Error::V2VersionCommand(0x22))
        );
        assert_eq!(
            parse(&with(13, 0x12), Accept::V2),
            Err(Error::V2Family(0x12))
        );
        assert_eq!(
            parse(&with(13, 0x41), Accept::V2),
            Err(Error::V2Family(0x41))
        );
        // Declared length shorter than the IPv4 addresses.
        let mut short = with(15, 4);
        short.truncate(20);
        assert!(parse(&short, Accept::V2).is_err());
        // Declared length beyond the cap: refused before any of it is read.
        let mut huge = good[..16].to_vec();
        huge[14] = 0xff;
        huge[15] = 0xff;
        assert_eq!(parse(&huge, Accept::V2), Err(Error::V2TooLong(16 + 0xffff)));
        // Signature byte off: not a header.
        assert!(matches!(
            parse(&with(11, b'X'), Accept::V2),
            Err(Error::NotProxy(_))
        ));
    }

    #[test]
    fn versions_are_only_those_accepted() {
        let v1 = b"PROXY UNKNOWN\r\n";
        let v2 = encode_v2(&Header::Local);
        assert!(matches!(parse(v1, Accept::V2), Err(Error::NotProxy("v2"))));
        assert!(matches!(parse(&v2, Accept::V1), Err(Error::NotProxy("v1"))));
        assert_eq!(parse(b"", Accept::V2), Ok(Parsed::Need(1)));
        assert_eq!(parse(&v2[..5], Accept::V2), Ok(Parsed::Need(7)));
        assert_eq!(parse(&v2[..12], Accept::V2), Ok(Parsed::Need(4)));
    }

    #[tokio::test]
    async fn read_header_leaves_the_client_bytes_in_the_socket() {
        for header in [
            b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 443\r\n".to_vec(),
            encode_v2(&Header::Proxy {
                source: addr("192.0.2.7:51234"),
                destination: addr("10.0.0.1:443"),
            }),
        ] {
            let (mut client, mut server) = tokio::io::duplex(4096);
            let mut sent = header.clone();
            sent.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
            tokio::io::AsyncWriteExt::write_all(&mut client, &sent)
                .await
                .unwrap();
            let h = read_header(&mut server, Accept::V1OrV2, Duration::from_secs(1))
                .await
                .unwrap();
            assert_eq!(h.client(addr("127.0.0.1:9")), addr("192.0.2.7:51234"));
            let mut rest = [0u8; 18];
            server.read_exact(&mut rest).await.unwrap();
            assert_eq!(&rest, b"GET / HTTP/1.1\r\n\r\n");
        }
    }

    #[tokio::test]
    async fn read_header_is_bounded_in_time_and_by_eof() {
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"PROXY TCP4 1.2")
            .await
            .unwrap();
        let r = read_header(&mut server, Accept::V1, Duration::from_millis(50)).await;
        assert_eq!(r, Err(Error::Timeout(Duration::from_millis(50))));
        drop(client);
        let r = read_header(&mut server, Accept::V1, Duration::from_secs(1)).await;
        assert!(matches!(r, Err(Error::Io(_))), "{r:?}");
    }

    fn any_addr_pair() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
        prop_oneof![
            (
                any::<[u8; 4]>(),
                any::<u16>(),
                any::<[u8; 4]>(),
                any::<u16>()
            )
                .prop_map(|(s, sp, d, dp)| (
                    SocketAddr::new(Ipv4Addr::from(s).into(), sp),
                    SocketAddr::new(Ipv4Addr::from(d).into(), dp)
                )),
            (
                any::<[u8; 16]>(),
                any::<u16>(),
                any::<[u8; 16]>(),
                any::<u16>()
            )
                .prop_map(|(s, sp, d, dp)| (
                    SocketAddr::new(Ipv6Addr::from(s).into(), sp),
                    SocketAddr::new(Ipv6Addr::from(d).into(), dp)
                )),
        ]
    }

    /// Bytes that look like the start of a header often enough to reach deep branches.
    fn header_like() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            (proptest::collection::vec(any::<u8>(), 0..300)).prop_map(|tail| {
                let mut v = V2_SIGNATURE.to_vec();
                v.extend(tail);
                v
            }),
            "PROXY [A-Z0-9 .:\r\n]{0,120}".prop_map(String::into_bytes),
        ]
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_never_claims_more_than_it_has(bytes in header_like()) {
            for accept in [Accept::V1, Accept::V2, Accept::V1OrV2] {
                match parse(&bytes, accept) {
                    Ok(Parsed::Done(_, len)) => prop_assert!(len <= bytes.len()),
                    Ok(Parsed::Need(n)) => {
                        prop_assert!(n > 0);
                        prop_assert!(bytes.len() + n <= V2_MAX_LEN);
                    }
                    Err(_) => {}
                }
            }
        }

        #[test]
        fn encoders_round_trip((source, destination) in any_addr_pair(), tail in proptest::collection::vec(any::<u8>(), 0..32)) {
            let h = Header::Proxy { source, destination };
            for (bytes, accept) in [(encode_v1(&h), Accept::V1), (encode_v2(&h), Accept::V2)] {
                prop_assert!(bytes.len() <= V1_MAX_LEN || accept == Accept::V2);
                let mut with_tail = bytes.clone();
                with_tail.extend_from_slice(&tail);
                prop_assert_eq!(parse(&with_tail, Accept::V1OrV2), Ok(Parsed::Done(h, bytes.len())));
            }
            prop_assert_eq!(parse(&encode_v2(&Header::Local), Accept::V2), Ok(Parsed::Done(Header::Local, 16)));
        }
    }
}
