//! Server side of the fixed newstyle handshake: greeting, client flags, and option
//! haggling up to `NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME`.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{ConnectionGuard, Export, ExportGuard};
use crate::backend::MetaContext;
use crate::proto::{self, *};

/// Outcome of a successful negotiation.
pub(super) struct Negotiated {
    pub(super) export: ExportGuard,
    pub(super) structured: bool,
    /// Selected contexts with the ids sent to the client.
    pub(super) contexts: Vec<(u32, MetaContext)>,
}

/// Transmission flags for `export` as this connection negotiated it. `single_client`
/// (a server limited to one connection) withdraws multi-conn, as QEMU does.
pub(super) fn transmission_flags(export: &Export, structured: bool, single_client: bool) -> u16 {
    let caps = export.backend.capabilities();
    let ro = export.read_only();
    let mut f = FLAG_HAS_FLAGS;
    let mut set = |cond: bool, flag: u16| {
        if cond {
            f |= flag;
        }
    };
    set(ro, FLAG_READ_ONLY);
    set(caps.flush, FLAG_SEND_FLUSH);
    set(caps.fua && !ro, FLAG_SEND_FUA);
    set(caps.trim && !ro, FLAG_SEND_TRIM);
    set(caps.write_zeroes && !ro, FLAG_SEND_WRITE_ZEROES);
    set(
        caps.write_zeroes && caps.fast_zero && !ro,
        FLAG_SEND_FAST_ZERO,
    );
    set(structured, FLAG_SEND_DF);
    set(caps.multi_conn && !single_client, FLAG_CAN_MULTI_CONN);
    set(caps.cache, FLAG_SEND_CACHE);
    f
}

/// Where a connection's negotiation begins.
pub(super) enum Start {
    /// A plain connection: greeting and client flags first.
    Greet,
    /// Inside TLS, after [`until_starttls`] exchanged greeting and flags in the clear.
    InTls {
        /// The client asked for no padding zeroes (`NBD_FLAG_C_NO_ZEROES`).
        no_zeroes: bool,
    },
}

struct State {
    /// The connection runs inside TLS.
    tls: bool,
    structured: bool,
    single_client: bool,
    no_zeroes: bool,
    /// Contexts chosen by the last `NBD_OPT_SET_META_CONTEXT`, for the export it named.
    meta: Option<(String, Vec<(u32, MetaContext)>)>,
}

enum Next {
    Continue,
    Close,
    Enter(Arc<Export>),
}

/// Runs the handshake. `Ok(None)` means the session ended during negotiation (client
/// abort, protocol violation the spec answers with a disconnect, unknown export for
/// `NBD_OPT_EXPORT_NAME`).
pub(super) async fn negotiate<R, W>(
    conn: &ConnectionGuard,
    r: &mut R,
    w: &mut W,
    start: Start,
) -> io::Result<Option<Negotiated>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tls, no_zeroes) = match start {
        Start::Greet => match greet(r, w).await? {
            Some(no_zeroes) => (false, no_zeroes),
            None => return Ok(None),
        },
        Start::InTls { no_zeroes } => (true, no_zeroes),
    };
    let mut st = State {
        tls,
        structured: false,
        single_client: conn.shared().config().max_connections == 1,
        no_zeroes,
        meta: None,
    };
    let mut out = Vec::new();
    loop {
        if r.read_u64().await? != IHAVEOPT {
            tracing::debug!("NBD option with bad magic");
            return Ok(None);
        }
        let option = r.read_u32().await?;
        let len = r.read_u32().await?;
        out.clear();
        let next = if len > MAX_OPTION_LEN {
            drain(r, len).await?;
            if option == OPT_EXPORT_NAME {
                Next::Close
            } else {
                encode_option_reply(&mut out, option, REP_ERR_TOO_BIG, b"option too large");
                Next::Continue
            }
        } else {
            let mut data = vec![0u8; len as usize];
            r.read_exact(&mut data).await?;
            handle_option(conn, &mut st, option, &data, &mut out)
        };
        if !out.is_empty() {
            w.write_all(&out).await?;
            w.flush().await?;
        }
        match next {
            Next::Continue => {}
            Next::Close => return Ok(None),
            Next::Enter(export) => {
                let Some(guard) = conn.attach(&export) else {
                    return Ok(None);
                };
                let contexts = match st.meta.take() {
                    Some((name, ctx)) if name == export.name => ctx,
                    _ => Vec::new(),
                };
                tracing::debug!(export = %export.name, structured = st.structured, "NBD client entered transmission");
                return Ok(Some(Negotiated {
                    export: guard,
                    structured: st.structured,
                    contexts,
                }));
            }
        }
    }
}

/// Sends the greeting and reads the client's flags; `Some(no_zeroes)` when the client
/// speaks fixed newstyle, `None` when the connection is to be closed.
async fn greet<R, W>(r: &mut R, w: &mut W) -> io::Result<Option<bool>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&greeting).await?;
    w.flush().await?;

    let client_flags = r.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        tracing::debug!(client_flags, "NBD client sent unknown flags");
        return Ok(None);
    }
    if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        tracing::debug!("NBD client does not speak fixed newstyle");
        return Ok(None);
    }
    Ok(Some(client_flags & FLAG_C_NO_ZEROES != 0))
}

/// The clear-text part of a TLS server's negotiation: greeting, client flags, and options
/// refused with `NBD_REP_ERR_TLS_REQD` until `NBD_OPT_STARTTLS`, which is acknowledged.
/// `Some(no_zeroes)` when the TLS handshake is to follow; `None` when the connection is to
/// be closed (`NBD_OPT_EXPORT_NAME` or `NBD_OPT_ABORT` in the clear, a bad option magic).
pub(super) async fn until_starttls<S>(s: &mut S) -> io::Result<Option<bool>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(no_zeroes) = greet_stream(s).await? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    loop {
        if s.read_u64().await? != IHAVEOPT {
            tracing::debug!("NBD option with bad magic");
            return Ok(None);
        }
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        drain(s, len).await?;
        out.clear();
        match option {
            OPT_STARTTLS if len == 0 => {
                encode_option_reply(&mut out, option, REP_ACK, &[]);
                s.write_all(&out).await?;
                s.flush().await?;
                return Ok(Some(no_zeroes));
            }
            OPT_STARTTLS => {
                encode_option_reply(&mut out, option, REP_ERR_INVALID, b"option takes no data")
            }
            OPT_EXPORT_NAME => {
                tracing::debug!("NBD_OPT_EXPORT_NAME before TLS");
                return Ok(None);
            }
            _ => {
                let text = format!("Option {option:#x} not permitted before TLS");
                encode_option_reply(&mut out, option, REP_ERR_TLS_REQD, text.as_bytes());
            }
        }
        s.write_all(&out).await?;
        s.flush().await?;
        if option == OPT_ABORT {
            return Ok(None);
        }
    }
}

/// [`greet`] over one stream that both reads and writes.
async fn greet_stream<S>(s: &mut S) -> io::Result<Option<bool>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut r, mut w) = tokio::io::split(s);
    greet(&mut r, &mut w).await
}

async fn drain<R: AsyncRead + Unpin>(r: &mut R, len: u32) -> io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(len as u64), &mut tokio::io::sink()).await?;
    if copied < len as u64 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn handle_option(
    conn: &ConnectionGuard,
    st: &mut State,
    option: u32,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Next {
    let shared = conn.shared();
    match option {
        OPT_EXPORT_NAME => {
            let Ok(name) = check_string(data) else {
                return Next::Close;
            };
            let Some(export) = shared.lookup(name) else {
                tracing::debug!(name, "NBD_OPT_EXPORT_NAME for an unknown export");
                return Next::Close;
            };
            out.extend_from_slice(&export.backend.size().to_be_bytes());
            out.extend_from_slice(
                &transmission_flags(&export, st.structured, st.single_client).to_be_bytes(),
            );
            if !st.no_zeroes {
                out.extend_from_slice(&[0u8; 124]);
            }
            Next::Enter(export)
        }
        OPT_ABORT => {
            encode_option_reply(out, option, REP_ACK, &[]);
            Next::Close
        }
        OPT_LIST => {
            if !data.is_empty() {
                encode_option_reply(out, option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                return Next::Continue;
            }
            for e in shared.list() {
                let mut p = Vec::new();
                p.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                p.extend_from_slice(e.name.as_bytes());
                if let Some(d) = &e.description {
                    p.extend_from_slice(d.as_bytes());
                }
                encode_option_reply(out, option, REP_SERVER, &p);
            }
            encode_option_reply(out, option, REP_ACK, &[]);
            Next::Continue
        }
        OPT_STARTTLS if st.tls => {
            encode_option_reply(out, option, REP_ERR_INVALID, b"TLS already enabled");
            Next::Continue
        }
        OPT_STARTTLS => {
            encode_option_reply(out, option, REP_ERR_POLICY, b"TLS not configured");
            Next::Continue
        }
        OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                encode_option_reply(out, option, REP_ERR_INVALID, b"option takes no data");
            } else if st.structured {
                encode_option_reply(
                    out,
                    option,
                    REP_ERR_INVALID,
                    b"structured reply already negotiated",
                );
            } else {
                st.structured = true;
                encode_option_reply(out, option, REP_ACK, &[]);
            }
            Next::Continue
        }
        OPT_INFO | OPT_GO => {
            let req = match parse_info_request(data) {
                Ok(r) => r,
                Err(Malformed(m)) => {
                    encode_option_reply(out, option, REP_ERR_INVALID, m.as_bytes());
                    return Next::Continue;
                }
            };
            let Some(export) = shared.lookup(req.name) else {
                let msg = format!("export '{}' not present", req.name);
                encode_option_reply(
                    out,
                    option,
                    REP_ERR_UNKNOWN,
                    truncate_str(&msg, MAX_STRING).as_bytes(),
                );
                return Next::Continue;
            };
            send_info(&export, st, &req.infos, option, out);
            if option == OPT_GO {
                Next::Enter(export)
            } else {
                Next::Continue
            }
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            if !st.structured {
                encode_option_reply(
                    out,
                    option,
                    REP_ERR_INVALID,
                    b"structured replies not negotiated",
                );
                return Next::Continue;
            }
            let req = match parse_meta_context_request(data) {
                Ok(r) => r,
                Err(Malformed(m)) => {
                    encode_option_reply(out, option, REP_ERR_INVALID, m.as_bytes());
                    return Next::Continue;
                }
            };
            let Some(export) = shared.lookup(req.export) else {
                let msg = format!("export '{}' not present", req.export);
                encode_option_reply(
                    out,
                    option,
                    REP_ERR_UNKNOWN,
                    truncate_str(&msg, MAX_STRING).as_bytes(),
                );
                return Next::Continue;
            };
            let list = option == OPT_LIST_META_CONTEXT;
            let found = match_contexts(&export.contexts(), &req.queries, list);
            let mut selected = Vec::new();
            for (i, ctx) in found.into_iter().enumerate() {
                let id = if list { 0 } else { i as u32 + 1 };
                let mut p = Vec::new();
                p.extend_from_slice(&id.to_be_bytes());
                p.extend_from_slice(ctx.name().as_bytes());
                encode_option_reply(out, option, REP_META_CONTEXT, &p);
                selected.push((id, ctx));
            }
            if !list {
                st.meta = Some((export.name.clone(), selected));
            }
            encode_option_reply(out, option, REP_ACK, &[]);
            Next::Continue
        }
        _ => {
            encode_option_reply(out, option, REP_ERR_UNSUP, b"option not supported");
            Next::Continue
        }
    }
}

fn send_info(export: &Export, st: &State, infos: &[u16], option: u32, out: &mut Vec<u8>) {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    p.extend_from_slice(&export.backend.size().to_be_bytes());
    p.extend_from_slice(&transmission_flags(export, st.structured, st.single_client).to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &p);
    if infos.contains(&INFO_NAME) {
        p.clear();
        p.extend_from_slice(&INFO_NAME.to_be_bytes());
        p.extend_from_slice(export.name.as_bytes());
        encode_option_reply(out, option, REP_INFO, &p);
    }
    if let (true, Some(d)) = (infos.contains(&INFO_DESCRIPTION), &export.description) {
        p.clear();
        p.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
        p.extend_from_slice(d.as_bytes());
        encode_option_reply(out, option, REP_INFO, &p);
    }
    // Sent even unrequested: clients that did not ask may ignore it, and the maximum
    // tells every client the payload limit.
    let bs = export.backend.capabilities().block_size;
    p.clear();
    p.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    p.extend_from_slice(&bs.minimum.max(1).to_be_bytes());
    p.extend_from_slice(&bs.preferred.max(bs.minimum).max(1).to_be_bytes());
    p.extend_from_slice(&bs.maximum.min(proto::MAX_PAYLOAD).to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &p);
    encode_option_reply(out, option, REP_ACK, &[]);
}

/// Resolves queries against the offered contexts. Namespace-wide queries (`base:`,
/// `qemu:`, `qemu:dirty-bitmap:`) and an empty query list only select when listing,
/// following the NBD spec and QEMU's documented query rules.
pub(super) fn match_contexts(
    offered: &[MetaContext],
    queries: &[&str],
    list: bool,
) -> Vec<MetaContext> {
    let mut found: Vec<MetaContext> = Vec::new();
    let mut add = |c: &MetaContext| {
        if !found.contains(c) {
            found.push(c.clone());
        }
    };
    if queries.is_empty() && list {
        offered.iter().for_each(&mut add);
    }
    for q in queries {
        for c in offered {
            let name = c.name();
            let hit = if *q == name {
                true
            } else if list {
                match c {
                    MetaContext::BaseAllocation => *q == "base:",
                    MetaContext::AllocationDepth => *q == "qemu:",
                    MetaContext::DirtyBitmap(_) => {
                        *q == "qemu:" || *q == CONTEXT_DIRTY_BITMAP_PREFIX
                    }
                }
            } else {
                false
            };
            if hit {
                add(c);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offered() -> Vec<MetaContext> {
        vec![
            MetaContext::BaseAllocation,
            MetaContext::AllocationDepth,
            MetaContext::DirtyBitmap("b1".into()),
            MetaContext::DirtyBitmap("b2".into()),
        ]
    }

    #[test]
    fn list_queries_expand_namespaces() {
        let o = offered();
        assert_eq!(match_contexts(&o, &[], true), o);
        assert_eq!(match_contexts(&o, &["qemu:"], true), o[1..].to_vec());
        assert_eq!(
            match_contexts(&o, &["qemu:dirty-bitmap:"], true),
            o[2..].to_vec()
        );
        assert_eq!(match_contexts(&o, &["base:"], true), o[..1].to_vec());
        assert!(match_contexts(&o, &["nbd-server:", "qemu:dirty-bitmap:b3"], true).is_empty());
    }

    #[test]
    fn set_queries_are_exact_and_deduplicated() {
        let o = offered();
        assert!(match_contexts(&o, &[], false).is_empty());
        assert!(match_contexts(&o, &["qemu:", "base:"], false).is_empty());
        assert_eq!(
            match_contexts(
                &o,
                &["qemu:dirty-bitmap:b2", "base:allocation", "base:allocation"],
                false
            ),
            vec![o[3].clone(), o[0].clone()]
        );
    }
}
