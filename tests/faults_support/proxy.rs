//! A loopback TCP proxy that can be stopped (every connection closed, new ones refused)
//! and started again on the same port, and that can drop one HTTP response.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

/// How connections are forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Bytes both ways, as they come (a database connection).
    Raw,
    /// HTTP/1.1 requests one by one, each on its own upstream connection, so that one
    /// response can be withheld.
    Http,
}

struct Shared {
    upstream: SocketAddr,
    mode: Mode,
    /// The `X-Amz-Target` whose next response is withheld.
    drop_next: Mutex<Option<String>>,
    dropped: AtomicUsize,
    /// Requests forwarded per `X-Amz-Target`.
    calls: Mutex<HashMap<String, usize>>,
}

/// A proxy on `127.0.0.1`, forwarding to `upstream` while started.
pub struct Proxy {
    address: SocketAddr,
    shared: Arc<Shared>,
    running: Mutex<Option<CancellationToken>>,
}

impl Proxy {
    /// Starts a proxy on a free loopback port.
    pub async fn start(upstream: SocketAddr, mode: Mode) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a port");
        let proxy = Proxy {
            address: listener.local_addr().unwrap(),
            shared: Arc::new(Shared {
                upstream,
                mode,
                drop_next: Mutex::new(None),
                dropped: AtomicUsize::new(0),
                calls: Mutex::new(HashMap::new()),
            }),
            running: Mutex::new(None),
        };
        proxy.serve(listener);
        proxy
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    fn serve(&self, listener: TcpListener) {
        let stop = CancellationToken::new();
        *self.running.lock().unwrap() = Some(stop.clone());
        let shared = self.shared.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((client, _)) = accepted else { continue };
                let shared = shared.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    // Returning drops both sockets: the client sees its connection close.
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = forward(shared, client) => {}
                    }
                });
            }
        });
    }

    /// Closes every connection and refuses new ones, as a server that went down.
    pub fn stop(&self) {
        if let Some(stop) = self.running.lock().unwrap().take() {
            stop.cancel();
        }
    }

    /// Accepts connections again, on the same port.
    pub async fn resume(&self) {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        // The old listener closes when its task sees the stop; the port frees soon after.
        let mut tries = 0;
        loop {
            match socket.bind(self.address) {
                Ok(()) => break,
                Err(err) if tries < 50 => {
                    tries += 1;
                    let _ = err;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(err) => panic!("cannot listen on {} again: {err}", self.address),
            }
        }
        self.serve(socket.listen(1024).expect("listen again"));
    }

    /// Withholds the response to the next request with this `X-Amz-Target` (such as
    /// `AmazonSQS.DeleteMessage`): the request reaches the server, then the client's
    /// connection is closed without an answer.
    pub fn drop_next_response(&self, target: &str) {
        assert_eq!(
            self.shared.mode,
            Mode::Http,
            "only HTTP responses can be dropped"
        );
        *self.shared.drop_next.lock().unwrap() = Some(target.to_owned());
    }

    /// How many responses were withheld.
    pub fn dropped(&self) -> usize {
        self.shared.dropped.load(Ordering::SeqCst)
    }

    /// How many requests with this `X-Amz-Target` were forwarded.
    pub fn calls(&self, target: &str) -> usize {
        self.shared
            .calls
            .lock()
            .unwrap()
            .get(target)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn forward(shared: Arc<Shared>, mut client: TcpStream) {
    match shared.mode {
        Mode::Raw => {
            let Ok(mut upstream) = TcpStream::connect(shared.upstream).await else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
        Mode::Http => {
            let mut buffer = Vec::new();
            while let Some(request) = read_message(&mut client, &mut buffer, false).await {
                let target = header(&request, "x-amz-target").unwrap_or_default();
                *shared
                    .calls
                    .lock()
                    .unwrap()
                    .entry(target.clone())
                    .or_default() += 1;
                let Ok(mut upstream) = TcpStream::connect(shared.upstream).await else {
                    return;
                };
                if upstream.write_all(&request).await.is_err() {
                    return;
                }
                let mut upstream_buffer = Vec::new();
                let Some(response) = read_message(&mut upstream, &mut upstream_buffer, true).await
                else {
                    return;
                };
                let withhold = {
                    let mut drop_next = shared.drop_next.lock().unwrap();
                    let hit = drop_next.as_deref() == Some(target.as_str());
                    if hit {
                        *drop_next = None;
                    }
                    hit
                };
                if withhold {
                    shared.dropped.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                if client.write_all(&response).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Reads one HTTP message (head and body) from `stream`, keeping extra bytes in `buffer`.
/// Bodies are delimited by `Content-Length`, by chunked encoding, or (responses only) by
/// the end of the connection.
async fn read_message(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    response: bool,
) -> Option<Vec<u8>> {
    let head_end = loop {
        if let Some(at) = find(buffer, b"\r\n\r\n") {
            break at + 4;
        }
        if !fill(stream, buffer).await {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let length = header_in(&head, "content-length").and_then(|v| v.parse::<usize>().ok());
    let chunked = header_in(&head, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let end = if let Some(length) = length {
        while buffer.len() < head_end + length {
            if !fill(stream, buffer).await {
                return None;
            }
        }
        head_end + length
    } else if chunked {
        loop {
            if let Some(at) = find(&buffer[head_end..], b"0\r\n\r\n") {
                break head_end + at + 5;
            }
            if !fill(stream, buffer).await {
                return None;
            }
        }
    } else if response {
        while fill(stream, buffer).await {}
        buffer.len()
    } else {
        head_end
    };
    Some(buffer.drain(..end).collect())
}

async fn fill(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buffer.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn header(message: &[u8], name: &str) -> Option<String> {
    let end = find(message, b"\r\n\r\n").unwrap_or(message.len());
    header_in(&String::from_utf8_lossy(&message[..end]), name)
}

fn header_in(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_owned())
    })
}
