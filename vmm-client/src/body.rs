//! Reading a frame body from a VMM that may be hostile: memory follows
//! the bytes that arrive, never the length the VMM announces.

use tokio::io::AsyncReadExt;

/// Largest frame other than a snapshot a VMM may send (call outputs are
/// bounded by the broker's payload limit, far below this).
pub(crate) const MAX_SMALL_FRAME: usize = 64 << 20;

/// How much of a body is allocated before its bytes arrive.
const EAGER: usize = 4 << 20;

/// Reads a frame body of `len` bytes, allocating as it arrives (a snapshot
/// starts with [`EAGER`] bytes of room, anything else with 64 KiB).
pub(crate) async fn read_body<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    len: usize,
    snapshot: bool,
) -> std::io::Result<Vec<u8>> {
    let start = if snapshot { EAGER } else { 64 << 10 };
    let mut body = Vec::with_capacity(len.min(start));
    let mut left = len;
    while left > 0 {
        let n = left.min(EAGER);
        let at = body.len();
        body.resize(at + n, 0);
        rd.read_exact(&mut body[at..]).await?;
        left -= n;
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::read_body;

    #[tokio::test]
    async fn a_body_is_read_whole_or_not_at_all() {
        let data = vec![7u8; (9 << 20) + 5];
        let got = read_body(&mut &data[..], data.len(), true).await.unwrap();
        assert_eq!(got, data);
        let got = read_body(&mut &b"abc"[..], 3, false).await.unwrap();
        assert_eq!(got, b"abc");
        assert!(read_body(&mut &b""[..], 0, false).await.unwrap().is_empty());
        // Announced but not sent: an error, and no buffer of that size.
        assert!(read_body(&mut &b"abc"[..], 1 << 30, true).await.is_err());
    }
}
