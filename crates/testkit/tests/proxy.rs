//! The link proxy itself: latency each way, the bandwidth cap shared by all connections, a small
//! message getting through beside a bulk transfer, blackholes that hold sockets open, dropped and
//! refused connections, and shape changes while traffic flows.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use testkit::{LinkProxy, LinkShape};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An echo server on loopback.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut read, mut write) = socket.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    address
}

async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> Duration {
    let started = Instant::now();
    stream.write_all(message).await.unwrap();
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(back, message);
    started.elapsed()
}

/// Sends `bytes` through the proxy and reads them back; returns the time taken.
async fn bulk_echo(proxy: SocketAddr, bytes: usize) -> Duration {
    let started = Instant::now();
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        write.write_all(&vec![7u8; bytes]).await.unwrap();
        write
    });
    let mut received = 0;
    let mut buffer = vec![0u8; 64 << 10];
    while received < bytes {
        let n = read.read(&mut buffer).await.unwrap();
        assert!(n > 0, "connection closed after {received} of {bytes} bytes");
        received += n;
    }
    drop(writer.await.unwrap());
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn latency_applies_each_way_and_changes_at_run_time() {
    let proxy = LinkProxy::start(echo_server().await, LinkShape::line(Duration::from_millis(100), 0));
    let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
    let first = round_trip(&mut stream, b"hello").await;
    assert!(first >= Duration::from_millis(200), "round trip {first:?} with 100 ms each way");
    assert!(first < Duration::from_secs(5), "round trip {first:?}");

    proxy.set_shape(LinkShape::line(Duration::from_millis(300), 0));
    let second = round_trip(&mut stream, b"again").await;
    assert!(second >= Duration::from_millis(600), "round trip {second:?} after raising latency to 300 ms");
    assert_eq!(proxy.bytes_up(), 10);
    assert_eq!(proxy.bytes_down(), 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn bandwidth_is_capped_and_shared_by_all_connections() {
    // 100 kB/s each way; two connections echo 75 kB each at the same time: 150 kB over the shared
    // line cannot take less than 1.5 s.
    let rate = 100_000;
    let proxy = LinkProxy::start(
        echo_server().await,
        LinkShape { up_bytes_per_second: rate, down_bytes_per_second: rate, ..LinkShape::default() },
    );
    let address = proxy.address();
    let started = Instant::now();
    let a = tokio::spawn(bulk_echo(address, 75_000));
    let b = tokio::spawn(bulk_echo(address, 75_000));

    // A small message on a third connection is not stuck behind the bulk transfers.
    let mut small = TcpStream::connect(address).await.unwrap();
    let small_trip = round_trip(&mut small, b"ping").await;

    a.await.unwrap();
    b.await.unwrap();
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(1_450), "150 kB at 100 kB/s took {elapsed:?}");
    assert!(elapsed < Duration::from_secs(20), "150 kB at 100 kB/s took {elapsed:?}");
    assert!(
        small_trip < Duration::from_millis(1_000),
        "a small message waited {small_trip:?} beside the bulk"
    );
    assert_eq!(proxy.bytes_up(), 150_004);

    // Lifting the cap at run time: the same transfer is much faster.
    proxy.set_shape(LinkShape::default());
    let uncapped = bulk_echo(address, 150_000).await;
    assert!(uncapped < elapsed, "uncapped {uncapped:?} vs capped {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn blackhole_holds_sockets_open_and_moves_nothing() {
    let proxy = LinkProxy::start(echo_server().await, LinkShape::default());
    let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
    round_trip(&mut stream, b"before").await;

    proxy.blackhole(true);
    stream.write_all(b"during").await.unwrap();
    let mut back = [0u8; 6];
    // Nothing comes back while the line is dark, and the connection is not closed either.
    let silent = tokio::time::timeout(Duration::from_millis(500), stream.read(&mut back)).await;
    assert!(silent.is_err(), "bytes or a close came through a blackhole: {silent:?}");
    // A new connection is accepted and held too.
    let mut held = TcpStream::connect(proxy.address()).await.unwrap();
    held.write_all(b"new").await.unwrap();
    assert_eq!(proxy.bytes_up(), 6);

    proxy.blackhole(false);
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"during");
    let mut back = [0u8; 3];
    held.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"new");
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_and_refused_connections_are_reset() {
    let proxy = LinkProxy::start(echo_server().await, LinkShape::default());
    let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
    round_trip(&mut stream, b"hi").await;
    assert_eq!(proxy.open_connections(), 1);

    assert_eq!(proxy.drop_connections(), 1);
    let mut buffer = [0u8; 8];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
        .await
        .expect("the drop is seen");
    assert!(matches!(read, Err(_) | Ok(0)), "{read:?}");

    proxy.refuse_connections(true);
    // The reset may even beat the end of connect().
    if let Ok(mut refused) = TcpStream::connect(proxy.address()).await {
        let read = tokio::time::timeout(Duration::from_secs(10), refused.read(&mut buffer))
            .await
            .expect("the refusal is seen");
        assert!(matches!(read, Err(_) | Ok(0)), "{read:?}");
    }

    proxy.refuse_connections(false);
    let mut fresh = TcpStream::connect(proxy.address()).await.unwrap();
    round_trip(&mut fresh, b"back").await;
    assert_eq!(proxy.accepted_connections(), 3);
}
