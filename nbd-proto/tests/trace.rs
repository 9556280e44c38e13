//! The debug trace: a handshake and a read, seen through a `log` logger, name
//! every option and reply, the command with its cookie, offset, length and
//! flags, its reply, and the changes of phase. One test in this binary,
//! since the logger is process-wide.

use std::sync::Mutex;

use bytes::BytesMut;
use log::{Level, LevelFilter, Log, Metadata, Record};
use nbd_proto::{CmdFlags, Config};
use nbd_testkit::{FakeServer, Pair, Style};

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl Log for Capture {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= Level::Debug
    }
    fn log(&self, record: &Record) {
        if record.target() == "nbd_proto" {
            LINES.lock().unwrap().push(record.args().to_string());
        }
    }
    fn flush(&self) {}
}

static LOGGER: Capture = Capture;

fn take_lines() -> Vec<String> {
    std::mem::take(&mut *LINES.lock().unwrap())
}

fn has(lines: &[String], needle: &str) -> bool {
    lines.iter().any(|l| l.contains(needle))
}

#[test]
fn a_handshake_and_a_read_are_traced_only_when_enabled() {
    log::set_logger(&LOGGER).expect("first logger");
    let server = || {
        FakeServer::builder()
            .style(Style::FixedNewstyle)
            .size(1 << 20)
            .structured(true)
            .extended(false)
            .build()
    };

    // Off: a whole handshake and read leave no line.
    log::set_max_level(LevelFilter::Off);
    let mut pair = Pair::new(Config::default(), server());
    pair.handshake().expect("handshake");
    let cookie = pair
        .client
        .pread(BytesMut::zeroed(4096), 8192, CmdFlags::empty())
        .unwrap();
    pair.wait(cookie).expect("read completes");
    assert!(take_lines().is_empty());

    // On: the same again, traced.
    log::set_max_level(LevelFilter::Debug);
    let mut pair = Pair::new(Config::default(), server());
    pair.handshake().expect("handshake");
    let lines = take_lines();
    let all = lines.join("\n");
    assert!(has(&lines, "recv greeting: newstyle"), "{all}");
    assert!(has(&lines, "send client flags"), "{all}");
    assert!(has(&lines, "send option NBD_OPT_STRUCTURED_REPLY"), "{all}");
    assert!(
        has(
            &lines,
            "recv option reply NBD_REP_ACK (0x1) to NBD_OPT_STRUCTURED_REPLY"
        ),
        "{all}"
    );
    assert!(has(&lines, "send option NBD_OPT_GO"), "{all}");
    assert!(has(&lines, "recv option reply NBD_REP_INFO"), "{all}");
    assert!(has(&lines, "state: transmission"), "{all}");

    let cookie = pair
        .client
        .pread(BytesMut::zeroed(4096), 8192, CmdFlags::empty())
        .unwrap();
    pair.wait(cookie).expect("read completes");
    let lines = take_lines();
    let all = lines.join("\n");
    let raw = cookie.get();
    let sent =
        format!("send command NBD_CMD_READ cookie {raw:#x} offset 8192 length 4096 flags 0x0000");
    assert!(has(&lines, &sent), "{sent}\n{all}");
    assert!(
        has(
            &lines,
            &format!("recv reply chunk OFFSET_DATA cookie {raw:#x}")
        ),
        "{all}"
    );

    pair.client.disconnect().unwrap();
    pair.drive();
    let lines = take_lines();
    let all = lines.join("\n");
    assert!(has(&lines, "send command NBD_CMD_DISC"), "{all}");
    assert!(has(&lines, "state: closed"), "{all}");
}
