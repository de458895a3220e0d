//! The socket with real descriptors: TCP connections cross it and still reach their peers,
//! the per-record limits hold, truncation is caught, big batches are split and put back.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::*;
use crate::handoff::record::tests::{bounds, conn};
use crate::handoff::record::{Batch, Commit, Part, FORMAT_CURRENT};

fn sockets() -> (HandOffSocket, HandOffSocket) {
    let (a, b) = HandOffSocket::pair().unwrap();
    (HandOffSocket::new(a).unwrap(), HandOffSocket::new(b).unwrap())
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// Receives the next record, waiting for it (bounded).
fn recv_one(s: &mut HandOffSocket) -> Received {
    loop {
        if let Some(r) = s.recv().unwrap() {
            return r;
        }
        assert!(s.wait_readable(soon()).unwrap(), "no record within 10 s");
    }
}

fn enough_descriptors() {
    crate::sys::raise_open_file_limit().unwrap();
}

#[test]
fn tcp_connections_cross_the_socket_and_still_reach_their_clients() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let clients: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(listener.local_addr().unwrap()).unwrap()).collect();
    let accepted: Vec<TcpStream> = (0..3).map(|_| listener.accept().unwrap().0).collect();
    // The batch says which client each descriptor belongs to, in the same order.
    let conns: Vec<_> = accepted
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut c = conn(i as u64 + 1);
            c.peer = s.peer_addr().unwrap();
            c
        })
        .collect();
    let record = Record::Batch(Batch { round: 1, conns: conns.clone() });
    let (mut o, mut n) = sockets();
    let fds: Vec<BorrowedFd> = accepted.iter().map(|s| s.as_fd()).collect();
    o.send_record(&record, FORMAT_CURRENT, &fds, soon()).unwrap();
    drop(accepted); // O closes its copies at commit; N's must still work

    let mut assembler = Assembler::new(bounds());
    let incoming = assembler.push(recv_one(&mut n), FORMAT_CURRENT).unwrap().expect("a whole record");
    assert_eq!(incoming.record, record);
    assert_eq!(incoming.fds.len(), 3);
    for ((fd, c), mut client) in incoming.fds.into_iter().zip(&conns).zip(clients) {
        let mut stream = TcpStream::from(fd);
        assert_eq!(stream.peer_addr().unwrap(), c.peer, "descriptor order follows the batch");
        assert_eq!(stream.peer_addr().unwrap(), client.local_addr().unwrap());
        stream.write_all(b"from N").unwrap();
        let mut buf = [0u8; 6];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"from N");
    }
}

#[test]
fn a_record_carries_200_descriptors_and_not_201() {
    enough_descriptors();
    let pairs: Vec<(UnixStream, UnixStream)> = (0..101).map(|_| UnixStream::pair().unwrap()).collect();
    let ends: Vec<BorrowedFd> = pairs.iter().flat_map(|(a, b)| [a.as_fd(), b.as_fd()]).collect();
    let (mut o, mut n) = sockets();

    let err = o.send(b"x", &ends[..201]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
    assert_eq!(o.recv().unwrap().map(|r| r.bytes), None);
    assert!(n.recv().unwrap().is_none(), "a refused record must not be sent at all");

    assert_eq!(o.send(b"x", &ends[..200]).unwrap(), Sent::Done);
    let received = recv_one(&mut n);
    assert_eq!(received.bytes, b"x");
    assert_eq!(received.fds.len(), 200);
    // The last descriptor received is the other end of the last pair sent.
    let mut last = UnixStream::from(received.fds.into_iter().last().unwrap());
    last.write_all(b"!").unwrap();
    let mut buf = [0u8; 1];
    (&pairs[99].0).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"!");
}

#[test]
fn lost_descriptors_are_an_error_not_a_short_batch() {
    let pairs: Vec<(UnixStream, UnixStream)> = (0..3).map(|_| UnixStream::pair().unwrap()).collect();
    let ends: Vec<BorrowedFd> = pairs.iter().map(|(a, _)| a.as_fd()).collect();
    let (mut o, mut n) = sockets();
    o.send(b"x", &ends).unwrap();
    assert!(n.wait_readable(soon()).unwrap());
    // Room for one descriptor only: the kernel sets MSG_CTRUNC and drops the others.
    let err = n.recv_with_fd_room(1).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("MSG_CTRUNC"), "{err}");
    // The descriptor that did arrive was closed, not leaked: with the sender's copies gone
    // too, every other end sees EOF (a leaked copy would keep the first one open).
    drop(ends);
    for (a, mut b) in pairs {
        drop(a);
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(b.read(&mut buf).unwrap(), 0, "a received copy is still open");
    }
}

#[test]
fn a_record_longer_than_the_limit_is_refused_both_ways() {
    let (mut o, mut n) = sockets();
    let big = vec![5u8; MAX_RECORD_BYTES + 1];
    assert_eq!(o.send(&big, &[]).unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
    // A peer that does not keep the limit: the receiver sees MSG_TRUNC.
    let big = vec![5u8; MAX_RECORD_BYTES + 10];
    let iov = [std::io::IoSlice::new(&big)];
    nix::sys::socket::sendmsg::<nix::sys::socket::UnixAddr>(
        std::os::fd::AsRawFd::as_raw_fd(&o.as_fd()),
        &iov,
        &[],
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .unwrap();
    assert!(n.wait_readable(soon()).unwrap());
    let err = n.recv().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("MSG_TRUNC"), "{err}");
}

#[test]
fn nothing_to_read_is_none_a_full_socket_is_wouldblock_and_a_close_is_eof() {
    let (mut o, mut n) = sockets();
    assert!(n.recv().unwrap().is_none());
    assert!(!n.wait_readable(Instant::now() + Duration::from_millis(20)).unwrap());
    let record = vec![1u8; MAX_RECORD_BYTES];
    let mut sent = 0;
    while o.send(&record, &[]).unwrap() == Sent::Done {
        sent += 1;
        assert!(sent < 10_000, "the socket never filled");
    }
    assert!(sent >= 1, "one record of MAX_RECORD_BYTES must fit (SO_SNDBUF)");
    assert!(!o.wait_writable(Instant::now() + Duration::from_millis(20)).unwrap());
    for _ in 0..sent {
        assert_eq!(recv_one(&mut n).bytes.len(), MAX_RECORD_BYTES);
    }
    drop(o);
    assert!(n.wait_readable(soon()).unwrap());
    assert_eq!(n.recv().unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
}

#[test]
fn a_3_mib_batch_goes_as_parts_and_comes_back_whole() {
    let (mut o, mut n) = sockets();
    let conns: Vec<_> = (0..3)
        .map(|i| {
            let mut c = conn(i + 1);
            c.out = (0..1024 * 1024).map(|b| (b * 7 + i as usize) as u8).collect();
            c
        })
        .collect();
    let record = Record::Batch(Batch { round: 2, conns });
    let encoded = encode_record(&record, FORMAT_CURRENT);
    let pieces = split_record(&encoded);
    assert!(pieces.len() >= 13, "3 MiB in records of 256 KiB: {} pieces", pieces.len());
    assert!(pieces.iter().all(|p| p.len() <= MAX_RECORD_BYTES));
    assert!(pieces[..pieces.len() - 1].iter().all(|p| p[0] == PART_TAG));
    assert_eq!(pieces.last().unwrap()[0], BATCH_TAG);

    let pairs: Vec<(UnixStream, UnixStream)> = (0..3).map(|_| UnixStream::pair().unwrap()).collect();
    let sender = {
        let record = record.clone();
        std::thread::spawn(move || {
            let fds: Vec<BorrowedFd> = pairs.iter().map(|(a, _)| a.as_fd()).collect();
            o.send_record(&record, FORMAT_CURRENT, &fds, soon()).unwrap();
            (o, pairs)
        })
    };
    let mut assembler = Assembler::new(bounds());
    let mut records = 0;
    let incoming = loop {
        let received = recv_one(&mut n);
        records += 1;
        // Descriptors travel with the final record only.
        if let Some(incoming) = assembler.push(received, FORMAT_CURRENT).unwrap() {
            break incoming;
        }
        assert!(assembler.in_progress());
    };
    let _keep = sender.join().unwrap();
    assert_eq!(records, pieces.len());
    assert_eq!(incoming.record, record);
    assert_eq!(incoming.fds.len(), 3);
    assert!(!assembler.in_progress());
}

#[test]
fn small_batches_are_not_split() {
    let encoded = encode_record(&Record::Batch(Batch { round: 1, conns: vec![conn(1)] }), FORMAT_CURRENT);
    assert_eq!(split_record(&encoded), vec![encoded]);
}

fn part(len: usize) -> Received {
    Received { bytes: encode_record(&Record::Part(Part { bytes: vec![0; len] }), 0), fds: Vec::new() }
}

#[test]
fn parts_beyond_max_batch_bytes_are_refused() {
    let mut assembler = Assembler::new(bounds());
    let chunk = MAX_RECORD_BYTES - PART_OVERHEAD;
    let mut pushed = 0;
    let err = loop {
        match assembler.push(part(chunk), FORMAT_CURRENT) {
            Ok(None) => pushed += chunk,
            Ok(Some(_)) => panic!("a Part is never a whole record"),
            Err(e) => break e,
        }
        assert!(pushed <= MAX_BATCH_BYTES, "accepted {pushed} bytes of Parts");
    };
    assert!(matches!(err, HandOffError::BatchTooLarge { .. }), "{err}");
    assert!(!assembler.in_progress(), "an error empties the assembler");
}

#[test]
fn descriptors_must_match_the_batch() {
    let pair = UnixStream::pair().unwrap();
    let fd = || OwnedFd::from(pair.0.try_clone().unwrap());
    let two = Record::Batch(Batch { round: 1, conns: vec![conn(1), conn(2)] });
    let mut assembler = Assembler::new(bounds());

    let one_fd = Received { bytes: encode_record(&two, FORMAT_CURRENT), fds: vec![fd()] };
    let err = assembler.push(one_fd, FORMAT_CURRENT).unwrap_err();
    assert!(matches!(err, HandOffError::FdCount { conns: 2, fds: 1 }), "{err}");

    let commit = Received { bytes: encode_record(&Record::Commit(Commit { round: 1 }), 2), fds: vec![fd()] };
    let err = assembler.push(commit, FORMAT_CURRENT).unwrap_err();
    assert!(matches!(err, HandOffError::UnexpectedFds { record: "Commit", fds: 1 }), "{err}");

    let part_with_fd = Received { bytes: part(3).bytes, fds: vec![fd()] };
    assert!(matches!(assembler.push(part_with_fd, 2), Err(HandOffError::UnexpectedFds { record: "Part", .. })));

    assert!(assembler.push(part(3), 2).unwrap().is_none());
    let commit = Received { bytes: encode_record(&Record::Commit(Commit { round: 1 }), 2), fds: vec![] };
    let err = assembler.push(commit, FORMAT_CURRENT).unwrap_err();
    assert!(matches!(err, HandOffError::PartsNotFollowedByBatch { record: "Commit" }), "{err}");

    let fine = Received { bytes: encode_record(&two, FORMAT_CURRENT), fds: vec![fd(), fd()] };
    assert_eq!(assembler.push(fine, FORMAT_CURRENT).unwrap().unwrap().record, two);
}

#[test]
fn mio_reports_the_socket_readable() {
    let (mut o, mut n) = sockets();
    let mut poll = mio::Poll::new().unwrap();
    let mut events = mio::Events::with_capacity(4);
    poll.registry().register(&mut n, mio::Token(7), mio::Interest::READABLE).unwrap();
    o.send(b"\x08", &[]).unwrap();
    poll.poll(&mut events, Some(Duration::from_secs(10))).unwrap();
    assert!(events.iter().any(|e| e.token() == mio::Token(7) && e.is_readable()));
    let incoming = Assembler::new(bounds()).push(n.recv().unwrap().unwrap(), 2).unwrap().unwrap();
    assert_eq!(incoming.record, Record::Done(crate::handoff::record::Done {}));
    poll.registry().deregister(&mut n).unwrap();
}

#[test]
fn a_peer_that_reads_nothing_times_the_sender_out() {
    let (mut o, _n) = sockets();
    let conns: Vec<_> = (0..2)
        .map(|i| {
            let mut c = conn(i + 1);
            c.out = vec![0x81; 1024 * 1024];
            c
        })
        .collect();
    let record = Record::Batch(Batch { round: 1, conns });
    let err = o.send_record(&record, FORMAT_CURRENT, &[], Instant::now() + Duration::from_millis(100)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
}
