//! Raw bytes over TCP, for what a well-behaved HTTP client cannot send: garbage, truncated bodies,
//! lying `Content-Length`s, oversized headers.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most bytes of an answer kept.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// What the client does after writing its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Keep the connection open and read until one full answer arrived, the node closes, or the
    /// timeout passes.
    ReadAnswer,
    /// Close the writing side (the node sees end of input), then read until the node closes.
    HalfClose,
    /// Close the connection at once without reading: a client that gave up mid-request.
    Abort,
}

/// What came back.
#[derive(Debug)]
pub struct RawAnswer {
    /// Everything read, possibly several answers or none.
    pub bytes: Vec<u8>,
    /// The first I/O error (reset, broken pipe, timeout), if any: a node may drop a connection
    /// that sent garbage.
    pub error: Option<std::io::Error>,
}

impl RawAnswer {
    /// The status of the first answer, if one arrived.
    pub fn status(&self) -> Option<u16> {
        let text = std::str::from_utf8(self.bytes.get(..12)?).ok()?;
        text.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
    }

    /// The body of the first answer (by its `Content-Length`), if one fully arrived.
    pub fn body(&self) -> Option<&[u8]> {
        let (head_end, length) = head_and_length(&self.bytes)?;
        self.bytes.get(head_end..head_end + length)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// Connects to `addr`, writes `request` (ignoring a write error once the node has hung up, which
/// it may do on garbage), ends as `ending` says, and returns what came back.
pub async fn exchange(addr: SocketAddr, request: &[u8], ending: Ending, timeout: Duration) -> RawAnswer {
    let mut stream = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let mut error = None;
    if let Err(e) = stream.write_all(request).await {
        error = Some(e);
    }
    match ending {
        Ending::Abort => {
            drop(stream);
            return RawAnswer { bytes: Vec::new(), error };
        }
        Ending::HalfClose => {
            let _ = stream.shutdown().await;
        }
        Ending::ReadAnswer => {}
    }
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(timeout, async {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    bytes.extend_from_slice(&buffer[..n]);
                    if bytes.len() >= MAX_ANSWER_BYTES {
                        return Ok(());
                    }
                    if ending == Ending::ReadAnswer {
                        if let Some((head_end, length)) = head_and_length(&bytes) {
                            if bytes.len() >= head_end + length {
                                return Ok(());
                            }
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    match read {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error = error.or(Some(e)),
        Err(_) => {
            error =
                error.or(Some(std::io::Error::new(std::io::ErrorKind::TimedOut, "no full answer in time")))
        }
    }
    RawAnswer { bytes, error }
}

/// Where the first answer's head ends and its `Content-Length` (0 if none).
fn head_and_length(bytes: &[u8]) -> Option<(usize, usize)> {
    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&bytes[..head_end]);
    let length = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0);
    Some((head_end, length))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_and_body_of_the_first_answer() {
        let answer = RawAnswer {
            bytes: b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 2\r\n\r\n{}HTTP/1.1 400".to_vec(),
            error: None,
        };
        assert_eq!(answer.status(), Some(413));
        assert_eq!(answer.body(), Some(&b"{}"[..]));
        assert_eq!(RawAnswer { bytes: b"HTTP/1.1 2".to_vec(), error: None }.status(), None);
    }
}
