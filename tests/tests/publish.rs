//! `iukfarm publish` against a real server: an OpenSSH sshd on loopback,
//! started by the test with throw-away host and user keys, rsync on both
//! ends, a staging and a final directory. Faults: the RM's build disagrees,
//! the connection is cut mid-copy, a copy on the server is damaged where
//! rsync's size-and-time check cannot see it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use iukfarm_tests::farm::{
    Archive, Proc, builds_of, coordinator, gpg, signed_release, status, wait_until,
};
use iukfarm_tests::{iukfarm, require_root, require_tool, run, sha256_file};

const LONG: Duration = Duration::from_secs(600);
const SSHD: &str = "/usr/sbin/sshd";

/// An sshd on 127.0.0.1 letting in one throw-away key; stopped on drop.
struct Sshd {
    proc: Proc,
    /// The ssh command (and options) that reaches it.
    ssh: String,
}

impl Sshd {
    fn start(dir: &Path) -> Sshd {
        require_root("runs an sshd that logs in as root");
        require_tool("ssh");
        require_tool("rsync");
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: apt-get install openssh-server (scripts/test.sh does)"
        );
        fs::create_dir_all(dir).unwrap();
        let keygen = |path: &Path| {
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(path));
        };
        let (host_key, user_key) = (dir.join("host_ed25519"), dir.join("id_ed25519"));
        keygen(&host_key);
        keygen(&user_key);
        fs::copy(dir.join("id_ed25519.pub"), dir.join("authorized_keys")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.join("sshd_config");
        fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
                 PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile {}\n",
                host_key.display(),
                dir.join("authorized_keys").display(),
                dir.join("sshd.pid").display()
            ),
        )
        .unwrap();
        // OpenSSH's privilege separation needs it; Debian's service makes it.
        fs::create_dir_all("/run/sshd").unwrap();
        let mut proc = Proc::spawn(
            "sshd",
            Command::new(SSHD)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config),
        );
        proc.wait_log("Server listening on 127.0.0.1", LONG);
        let host_pub = fs::read_to_string(dir.join("host_ed25519.pub")).unwrap();
        let known = dir.join("known_hosts");
        fs::write(&known, format!("[127.0.0.1]:{port} {host_pub}")).unwrap();
        let ssh = format!(
            "ssh -p {port} -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o UserKnownHostsFile={} \
             -o StrictHostKeyChecking=yes -o LogLevel=ERROR",
            user_key.display(),
            known.display()
        );
        Sshd { proc, ssh }
    }

    /// Cuts every open connection (the listener stays).
    fn cut(&self) {
        let _ = Command::new("pkill")
            .args(["-KILL", "-P", &self.proc.pid().to_string()])
            .status();
    }
}

fn publish(release: &Path, sshd: &Sshd, rm_sums: &Path, server: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(iukfarm());
    c.arg("publish")
        .arg(release)
        .arg("--cert")
        .arg(&gpg().cert)
        .arg("--rm-sums")
        .arg(rm_sums)
        .args(["--host", "root@127.0.0.1", "--ssh", &sshd.ssh])
        .arg("--staging-dir")
        .arg(server.join("staging"))
        .args(extra);
    c
}

fn output(mut c: Command) -> (i32, String) {
    let o: Output = c.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn publish_checks_on_the_server_resumes_a_cut_copy_and_promotes() {
    require_tool("pkill");
    let a = Archive::make_with(3, &["--layout", "6"]);
    let d = tempfile::tempdir().unwrap();
    let release = d.path().join("release");
    signed_release(&a, &release);
    // The RM's own build, on their machine.
    let rm: Vec<(String, String)> = builds_of(&a, "6.2", &a.versions[..2]);
    let sums = |rm: &[(String, String)]| {
        rm.iter()
            .map(|(n, h)| format!("{h}  {n}\n"))
            .collect::<String>()
    };
    let rm_sums = d.path().join("to_6.2.sha256sum");
    fs::write(&rm_sums, sums(&rm)).unwrap();
    let sshd = Sshd::start(&d.path().join("sshd"));
    let server = d.path().join("server");
    let (staging, fin) = (server.join("staging"), server.join("final"));
    fs::create_dir_all(server.join("project")).unwrap();

    // The RM's build disagrees: exit 3 naming the kit, nothing copied.
    let mut wrong = rm.clone();
    wrong[1].1 = "0".repeat(64);
    let wrong_sums = d.path().join("wrong.sha256sum");
    fs::write(&wrong_sums, sums(&wrong)).unwrap();
    let (code, out) = output(publish(&release, &sshd, &wrong_sums, &server, &[]));
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains(&format!(
            "differs from the RM's build: {} (release",
            rm[1].0
        )),
        "{out}"
    );
    assert!(files(&staging).is_empty(), "nothing copied");

    // The connection is cut mid-copy: exit 1, a partial copy stays.
    let mut slow = Proc::spawn(
        "publish",
        &mut publish(&release, &sshd, &rm_sums, &server, &["--bwlimit", "16"]),
    );
    wait_until("a copy is under way", LONG, || {
        Command::new("pgrep")
            .args(["-f", "rsync --server"])
            .status()
            .is_ok_and(|s| s.success())
    });
    // Two kits at 16 KiB/s take many seconds: cut in the middle.
    std::thread::sleep(Duration::from_secs(2));
    sshd.cut();
    let code = slow.wait(LONG).code();
    assert_eq!(code, Some(1), "{}", slow.log());
    assert!(
        slow.log().contains("run the same command again"),
        "{}",
        slow.log()
    );
    let first = release.join(&rm[0].0);
    let complete = rm
        .iter()
        .filter(|(n, h)| staging.join(n).exists() && &sha256_file(&staging.join(n)) == h)
        .count();
    assert!(complete < rm.len(), "the copy was cut before its end");
    // A copy on the server damaged where rsync's quick check (size and
    // time) cannot see it: the server-side hash finds it.
    let damage = |name: &str| {
        let original = release.join(name);
        let mut bytes = fs::read(&original).unwrap();
        bytes[1000] ^= 0x40;
        let damaged = staging.join(name);
        fs::write(&damaged, &bytes).unwrap();
        let mtime = fs::metadata(&original).unwrap().modified().unwrap();
        fs::File::options()
            .write(true)
            .open(&damaged)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
    };
    damage(&rm[1].0);

    // Run again: resumed, repaired, checked on the server.
    let (code, out) = output(publish(&release, &sshd, &rm_sums, &server, &[]));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("every copy hashed on the server matches"),
        "{out}"
    );
    for (n, h) in &rm {
        assert_eq!(&sha256_file(&staging.join(n)), h, "{n} on the server");
    }

    // Promoted with Tails' modes and the trace file, a copy damaged since
    // the last run sent again first. Again: nothing to do.
    damage(&rm[0].0);
    let trace_file = server.join("project/trace");
    let promote = [
        "--promote",
        "--final-dir",
        fin.to_str().unwrap(),
        "--owner",
        "root:root",
        "--trace-file",
        trace_file.to_str().unwrap(),
    ];
    let (code, out) = output(publish(&release, &sshd, &rm_sums, &server, &promote));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("published 2 IUKs"), "{out}");
    assert!(out.contains("copying 1 IUKs"), "{out}");
    assert!(files(&staging).is_empty(), "staging emptied");
    for (n, h) in &rm {
        let p = fin.join(n);
        assert_eq!(&sha256_file(&p), h);
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
    }
    let trace = fs::read_to_string(server.join("project/trace")).unwrap();
    assert!(trace.trim().parse::<u64>().is_ok(), "{trace:?}");
    let (code, out) = output(publish(&release, &sshd, &rm_sums, &server, &promote));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("already published"), "{out}");
    assert_eq!(
        fs::read_to_string(server.join("project/trace")).unwrap(),
        trace
    );

    // Only some source versions (Tails 7's release process passes the new
    // major's): the others, and the RM's lines for them, are left alone.
    let only = |re: &str| {
        let mut args = promote.to_vec();
        args.extend(["--source-version-regexp", re]);
        output(publish(&release, &sshd, &wrong_sums, &server, &args))
    };
    let (code, out) = only("6[.]0");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("1 IUKs from source versions matching \"6[.]0\"; 1 left alone"),
        "{out}"
    );
    assert!(out.contains("already published"), "{out}");
    let (code, out) = only("6[.]1");
    assert_eq!(code, 3, "the wrong line of 6.1 is checked: {out}");
    assert!(out.contains(&rm[1].0), "{out}");
    let (code, out) = only("7[.].*");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("matches none"), "{out}");
    let (code, out) = only("6[.");
    assert_eq!(code, 2, "{out}");

    // Straight from the running coordinator, lingering once the release is
    // signed (here: restarted on the same directory, it resumes every kit
    // from its journal): fetched, checked, already published.
    let key = gpg().secret_key.to_str().unwrap().to_string();
    let (mut c, url) = coordinator(&a, &release, &["--signing-key", &key, "--linger", "300s"]);
    let url = format!("http://{url}");
    wait_until("the release is signed again", LONG, || {
        assert_eq!(c.poll(), None, "{}", c.log());
        status(&url, &[]).is_some_and(|s| s["state"] == "succeeded")
    });
    let fetched = d.path().join("fetched");
    let mut from_coordinator = promote.to_vec();
    from_coordinator.extend(["--fetch", "--coordinator", &url]);
    let (code, out) = output(publish(
        &fetched,
        &sshd,
        &rm_sums,
        &server,
        &from_coordinator,
    ));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("already published"), "{out}");
    for (n, h) in &rm {
        assert_eq!(&sha256_file(&fetched.join(n)), h);
    }
    let (code, out) = output(publish(
        &fetched,
        &sshd,
        &rm_sums,
        &server,
        &from_coordinator,
    ));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "already fetched {}",
            fetched.join(&rm[0].0).display()
        )),
        "{out}"
    );
    c.kill9();

    // A release directory that no longer matches its signed manifest is
    // not published.
    fs::write(&first, b"not the kit").unwrap();
    let (code, out) = output(publish(&release, &sshd, &rm_sums, &server, &promote));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("does not match its signed manifest"), "{out}");
    assert_eq!(
        &sha256_file(&fin.join(&rm[0].0)),
        &rm[0].1,
        "published kit untouched"
    );
}

/// `iukfarm demo --end-of-release`: the RM's own build, signed UDFs and a
/// publication on a "server" directory, each checked here with tools
/// iukfarm did not write (sha256sum's format, sqv).
#[test]
fn the_demo_ends_the_release_on_this_machine() {
    require_tool("rsync");
    require_tool("sqv");
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("demo");
    let r = run(Command::new(iukfarm())
        .args([
            "demo",
            "--releases",
            "3",
            "--scale",
            "2",
            "--plain",
            "--end-of-release",
        ])
        .arg("--output-dir")
        .arg(&out));
    let said = String::from_utf8_lossy(&r.stdout);
    assert!(said.contains("published 2 IUKs"), "{said}");
    let sums = |p: &Path| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| {
                let (h, n) = l.split_once("  ").unwrap();
                (n.to_string(), h.to_string())
            })
            .collect();
        v.sort();
        v
    };
    let release = sums(&out.join("release/SHA256SUMS"));
    assert_eq!(release.len(), 2);
    assert_eq!(sums(&out.join("rm-build/SHA256SUMS")), release);
    let fin = out.join("server/srv/rsync/tails/tails/stable/iuk/v2");
    for (n, h) in &release {
        assert_eq!(&sha256_file(&fin.join(n)), h, "{n} published");
    }
    assert!(
        out.join("server/srv/rsync/tails/tails/project/trace")
            .is_file()
    );
    let udfs: Vec<PathBuf> = walk(&out.join("website"))
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "upgrades.yml"))
        .collect();
    // 7.2's and 7.3's (alpha, stable), 7.0's and 7.1's stable ones.
    assert_eq!(udfs.len(), 6, "{udfs:?}");
    let cert = out.join("demo-signing-key.asc");
    for u in &udfs {
        let mut sig = u.clone().into_os_string();
        sig.push(".pgp");
        run(Command::new("sqv")
            .arg("--keyring")
            .arg(&cert)
            .arg(&sig)
            .arg(u));
    }
    let one = fs::read_to_string(
        out.join("website/wiki/src/upgrade/v2/Tails/7.0/amd64/stable/upgrades.yml"),
    )
    .unwrap();
    assert!(one.contains(&release[0].1), "{one}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
