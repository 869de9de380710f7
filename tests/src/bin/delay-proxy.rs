//! A TCP proxy that adds latency, for the multi-host tests (this kernel
//! has no netem): every byte is forwarded DELAY_MS after it arrived, in
//! both directions, without limiting throughput.
//!
//! Usage: delay-proxy LISTEN_ADDR TARGET_ADDR DELAY_MS

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, target, delay] = &args[..] else {
        eprintln!("usage: delay-proxy LISTEN_ADDR TARGET_ADDR DELAY_MS");
        std::process::exit(2);
    };
    let delay = Duration::from_millis(delay.parse().expect("DELAY_MS is a number"));
    let l = TcpListener::bind(listen).unwrap_or_else(|e| panic!("{listen}: {e}"));
    eprintln!("delay-proxy: listening on {listen}");
    for client in l.incoming() {
        let Ok(client) = client else { continue };
        let Ok(server) = TcpStream::connect(target) else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        pump(&client, &server, delay);
        pump(&server, &client, delay);
    }
}

/// Forwards `from` to `to`, each read held back by `delay`: a reader
/// thread stamps what arrives, a writer thread sends it when due.
fn pump(from: &TcpStream, to: &TcpStream, delay: Duration) {
    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
    // Bounded like a real link's queue: a reader with a full queue stops
    // reading, and TCP pushes back. Unbounded, it held seconds of an ISO
    // stream ahead of every heartbeat reply on a capped link.
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(4);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = from.shutdown(Shutdown::Read);
    });
    std::thread::spawn(move || {
        // The reader's end (its sender dropped) arrives after the data, on time.
        for (due, bytes) in rx {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
