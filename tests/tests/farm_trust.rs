//! The farm tried as an attacker and as bad luck would: a worker that lies
//! on the wire, a full output disk, inputs that are not what the RM vouches
//! for, a rerun that must change nothing, and `iukfarm build` held to the
//! coordinator's rules. Each ends with the kits equal to local builds (0
//! bytes lost, 0 wrong kits signed) or with nothing changed.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use iukfarm_engine::blockcache::BlockId;
use iukfarm_engine::sqfs::XzConfig;
use iukfarm_proto::{ClientConfig, FarmClient, PROTOCOL_VERSION, v1};
use iukfarm_tests::farm::{
    Archive, Proc, SDE, archive, coordinator, coordinator_cmd_dated, gpg, iuks_in, local_builds,
    status, token_file, wait_until, worker,
};
use iukfarm_tests::{iukfarm, require_root, require_tool, run, sha256_file};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const LONG: Duration = Duration::from_secs(600);
const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn code(p: &mut Proc) -> i32 {
    p.wait(LONG).code().unwrap_or(-1)
}

/// A worker speaking the protocol directly, saying whatever the test wants.
struct Liar {
    client: FarmClient,
    id: String,
}

impl Liar {
    async fn register(url: &str, name: &str) -> Liar {
        let mut client = iukfarm_proto::connect(&ClientConfig {
            url: url.into(),
            tls_ca: None,
            identity: None,
            token: Some(TOKEN.into()),
        })
        .await
        .unwrap();
        let fp = iukfarm_engine::fingerprint::fingerprint();
        let id = client
            .register(v1::RegisterRequest {
                protocol: PROTOCOL_VERSION,
                name: name.into(),
                fingerprint: Some(v1::Fingerprint {
                    engine_version: fp.engine_version,
                    git_commit: fp.git_commit,
                    liblzma_version: fp.liblzma_version,
                    iuk_format: fp.iuk_format,
                    gensquashfs: fp.gensquashfs.clone(),
                }),
                slots: 4,
                memory_bytes: 64 << 30,
            })
            .await
            .unwrap()
            .into_inner()
            .worker_id;
        Liar { client, id }
    }

    async fn lease(&mut self) -> v1::Job {
        let t = Instant::now();
        loop {
            let r = self
                .client
                .lease(v1::LeaseRequest {
                    worker_id: self.id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            if let Some(j) = r.job {
                return j;
            }
            assert!(!r.release_over, "the release ended under the liar");
            assert!(t.elapsed() < LONG, "no job for the liar");
            tokio::time::sleep(Duration::from_millis(r.retry_after_ms.max(50))).await;
        }
    }

    fn header(&self, job: &v1::Job, size: u64, sha256: &str, secs: f64) -> v1::UploadMessage {
        v1::UploadMessage {
            part: Some(v1::upload_message::Part::Header(v1::UploadHeader {
                worker_id: self.id.clone(),
                lease_id: job.lease_id.clone(),
                size,
                sha256: sha256.into(),
                build_seconds: secs,
                summary: String::new(),
                blocks: None,
            })),
        }
    }

    async fn upload(&mut self, msgs: Vec<v1::UploadMessage>) -> Result<(), tonic::Status> {
        self.client
            .upload(tokio_stream::iter(msgs))
            .await
            .map(|_| ())
    }
}

fn data(bytes: Vec<u8>) -> v1::UploadMessage {
    v1::UploadMessage {
        part: Some(v1::upload_message::Part::Data(bytes)),
    }
}

#[test]
fn lying_workers_are_refused_while_the_honest_one_finishes() {
    let a = archive();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("release");
    let key = gpg().secret_key.to_str().unwrap().to_string();
    let token = token_file(d.path(), TOKEN);
    let (mut c, addr) = coordinator(
        a,
        &out,
        &[
            "--signing-key",
            &key,
            "--token-file",
            token.to_str().unwrap(),
            "--max-attempts",
            "20",
        ],
    );
    let url = format!("http://{addr}");
    let incoming = out.join(".iukfarm/incoming");
    let cache = d.path().join("cache");
    let root = a.root().to_str().unwrap();
    let token_arg = token.to_str().unwrap();
    let honest_args = ["--once", "--iso-root", root, "--token-file", token_arg];
    let mut honest = None;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut refused = 0;
    rt.block_on(async {
        let mut liar = Liar::register(&url, "liar").await;
        let zeros = "0".repeat(64);

        // NaN (it used to make the journal line, and the manifest, unreadable).
        let job = liar.lease().await;
        let e = liar
            .upload(vec![
                liar.header(&job, 10, &zeros, f64::NAN),
                data(vec![0; 10]),
            ])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("not a duration"), "{e:?}");
        refused += 1;

        // More than a kit can weigh: refused before a byte is written.
        let job = liar.lease().await;
        let e = liar
            .upload(vec![liar.header(&job, 1 << 40, &zeros, 1.0)])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("outside"), "{e:?}");
        refused += 1;

        // Bytes that do not match the announced digest.
        let job = liar.lease().await;
        let e = liar
            .upload(vec![
                liar.header(&job, 4096, &zeros, 1.0),
                data(vec![7; 4096]),
            ])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::DataLoss, "{e:?}");
        refused += 1;

        // More bytes than announced.
        let job = liar.lease().await;
        let e = liar
            .upload(vec![
                liar.header(&job, 10, &zeros, 1.0),
                data(vec![1; 4096]),
            ])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::DataLoss, "{e:?}");
        refused += 1;

        // A second stream on a lease whose first upload is in progress.
        let job = liar.lease().await;
        let (tx, rx) = mpsc::channel(4);
        tx.send(liar.header(&job, 1 << 20, &zeros, 1.0))
            .await
            .unwrap();
        tx.send(data(vec![3; 4096])).await.unwrap();
        let mut first = liar.client.clone();
        let first = tokio::spawn(async move { first.upload(ReceiverStream::new(rx)).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let e = liar
            .upload(vec![
                liar.header(&job, 4096, &zeros, 1.0),
                data(vec![9; 4096]),
            ])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
        refused += 1;
        drop(tx);
        let e = first.await.unwrap().unwrap_err();
        assert_eq!(e.code(), Code::DataLoss, "the cut first stream: {e:?}");

        // Acting on a lease that is not its own (ids are random).
        liar.client
            .fail(v1::FailRequest {
                worker_id: liar.id.clone(),
                lease_id: "lease-0000".into(),
                message: "it is broken".into(),
                deterministic: true,
            })
            .await
            .unwrap();
        // The part files of every refused upload are gone.
        wait_until("no part file is left", Duration::from_secs(10), || {
            fs::read_dir(&incoming).unwrap().next().is_none()
        });

        // Lies that only building the IUK can expose, told while an honest
        // worker is in the farm: a failure called deterministic, bytes that
        // are no kit, and a well-formed kit of another IUK, their sizes and
        // digests told truly. The three jobs go to the honest worker.
        // The kit of an IUK from the new release to itself: well formed,
        // and wrong for every job. (A kit from an older source would not
        // do: it may well turn a newer source into the new release.)
        let fake = d.path().join("fake.iuk");
        // (Dated a second after the new release: a kit from a release to
        // itself dated like it is refused.)
        run(Command::new(iukfarm())
            .args([
                "build",
                "--quiet",
                "--source-date-epoch",
                "1730285445",
                // (Named as from an older version: a kit from a version to
                // itself is refused as a mistake.)
                "--old-version",
                "7.3",
                "--old-iso",
            ])
            .arg(a.iso(a.new_version()))
            .arg("--new-iso")
            .arg(a.iso(a.new_version()))
            .arg("--out")
            .arg(&fake));
        let wrong = liar.lease().await;
        let garbage = liar.lease().await;
        let failed = liar.lease().await;
        honest = Some(worker("honest", &url, &cache, &honest_args));
        wait_until("the honest worker is in the farm", LONG, || {
            status(&url, &["--token-file", token.to_str().unwrap()]).is_some_and(|s| {
                (s["workers"].as_array().unwrap().iter()).any(|w| w["name"] == "honest")
            })
        });
        liar.client
            .fail(v1::FailRequest {
                worker_id: liar.id.clone(),
                lease_id: failed.lease_id.clone(),
                // Escape sequences that would clear the RM's terminal and
                // set its title, and a flood: bounded and shown plainly.
                message: format!(
                    "the old ISO is corrupt\x1b[2J\x1b]0;owned\x07{}",
                    "A".repeat(1 << 20)
                ),
                deterministic: true,
            })
            .await
            .unwrap();
        refused += 1;
        let junk = vec![0x5a; 8192];
        fs::write(d.path().join("junk"), &junk).unwrap();
        let digest = sha256_file(&d.path().join("junk"));
        (liar
            .upload(vec![liar.header(&garbage, 8192, &digest, 1.0), data(junk)])
            .await)
            .expect("bytes with their true digest are received, then verified");
        refused += 1;
        let kit = fs::read(&fake).unwrap();
        let mut msgs = vec![liar.header(&wrong, kit.len() as u64, &sha256_file(&fake), 1.0)];
        msgs.extend(
            kit.chunks(iukfarm_proto::CHUNK_SIZE)
                .map(|c| data(c.to_vec())),
        );
        liar.upload(msgs)
            .await
            .expect("a well-formed kit is received, then verified");
        refused += 1;
    });
    let mut w = honest.expect("the honest worker was started");
    assert_eq!(code(&mut c), 0, "{}", c.log());
    assert_eq!(code(&mut w), 0, "{}", w.log());
    assert_eq!(&iuks_in(&out), local_builds());
    // The jobs went to the honest worker: no lie failed an IUK.
    for said in [
        "liar: the old ISO is corrupt",
        "the kit built by liar cannot be applied",
        "the kit built by liar does not turn",
    ] {
        assert!(c.log().contains(said), "{said}: {}", c.log());
    }
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("manifest.json")).unwrap()).unwrap();
    for k in m["iuks"].as_array().unwrap() {
        assert_eq!(k["worker"], "honest", "{m}");
    }
    assert!(!c.log().contains('\x1b'), "an escape reached the log");
    assert!(c.log().contains("corrupt?[2J?]0;owned?AAAA"), "{}", c.log());
    assert!(
        c.log().len() < 1 << 20,
        "the flood reached the log: {} bytes",
        c.log().len()
    );
    assert!(
        c.log().contains("refused a second upload stream"),
        "{}",
        c.log()
    );
    assert!(fs::read_dir(&incoming).unwrap().next().is_none());
    eprintln!("lies refused: {refused}; kits: 4 equal to local builds; wrong kits signed: 0");
}

/// A tmpfs of `mib` MiB mounted on `dir` until dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u64) -> Tmpfs {
        require_root("mounts a small tmpfs as the coordinator's output disk");
        fs::create_dir_all(dir).unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir));
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system of `dir` but for about `keep` bytes.
fn fill(dir: &Path, keep: u64) -> std::path::PathBuf {
    let p = dir.join("filler");
    // SAFETY: statvfs on a valid path into a zeroed struct.
    let free = unsafe {
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        let mut s: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(c.as_ptr(), &mut s), 0);
        s.f_bavail * s.f_frsize
    };
    let f = fs::File::create(&p).unwrap();
    let mut w = std::io::BufWriter::new(f);
    let chunk = vec![0x55u8; 1 << 16];
    let mut left = free.saturating_sub(keep);
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        if std::io::Write::write_all(&mut w, &chunk[..n]).is_err() {
            break;
        }
        left -= n as u64;
    }
    let _ = std::io::Write::flush(&mut w);
    p
}

#[test]
fn a_full_output_disk_loses_nothing_and_a_refused_rerun_changes_nothing() {
    let a = archive();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("release");
    let _disk = Tmpfs::mount(&out, 64);
    let filler = fill(&out, 256 << 10);
    let key = gpg().secret_key.to_str().unwrap().to_string();
    let args = [
        "--signing-key",
        key.as_str(),
        "--max-attempts",
        "30",
        "--linger",
        "120s",
    ];
    let (mut c, addr) = coordinator(a, &out, &args);
    let url = format!("http://{addr}");
    let cache = d.path().join("cache");
    let root = a.root().to_str().unwrap();
    // Not --once: it waits for the next release, and must not register
    // with this one again while it lingers.
    let w = worker("w", &url, &cache, &["--iso-root", root]);
    c.wait_log("No space left on device", LONG);
    fs::remove_file(&filler).unwrap();
    c.wait_log("release over; serving status", LONG);
    assert_eq!(&iuks_in(&out), local_builds(), "0 bytes lost");
    assert!(
        fs::read_dir(out.join(".iukfarm/incoming"))
            .unwrap()
            .next()
            .is_none(),
        "no part file left"
    );
    let journal = fs::read_to_string(out.join(".iukfarm/journal")).unwrap();
    assert_eq!(journal.lines().count(), 4, "{journal}");
    for l in journal.lines() {
        serde_json::from_str::<serde_json::Value>(l).expect("whole journal lines");
    }
    // The worker's retries every 5 s must not pile up registrations.
    std::thread::sleep(Duration::from_secs(8));
    let s = status(&url, &[]).expect("the lingering coordinator answers");
    assert_eq!(s["workers"].as_array().unwrap().len(), 1, "{s}");
    // SIGTERM ends the linger at once.
    let t = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(c.pid() as i32, libc::SIGTERM) };
    assert_eq!(code(&mut c), 0, "{}", c.log());
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    drop(w);

    // Reruns into the finished release's directory that are not that
    // release: refused, and the signed release is left exactly as it was.
    let signed: Vec<(String, String)> = ["SHA256SUMS", "manifest.json", "manifest.json.asc"]
        .iter()
        .map(|f| (f.to_string(), sha256_file(&out.join(f))))
        .collect();
    let refused = |new: &str, sources: &[String], sde: &str| {
        let o = coordinator_cmd_dated(
            a,
            new,
            sources,
            sde,
            &out,
            "127.0.0.1:0",
            &["--signing-key", &key],
        )
        .output()
        .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{new}: {e}");
        assert!(e.contains("holds a signed release"), "{new}: {e}");
        for (f, sha) in &signed {
            assert_eq!(&sha256_file(&out.join(f)), sha, "{new}: {f} untouched");
        }
        assert_eq!(&iuks_in(&out), local_builds());
    };
    // The same release with another SOURCE_DATE_EPOCH.
    refused(a.new_version(), a.sources(), "1730285445");
    // A release of another version (none of its kits there yet), before
    // its plan removes the signed files.
    let (older, sources) = a.sources().split_last().unwrap();
    refused(older, sources, SDE);
}

#[test]
fn a_kit_changed_after_its_verification_is_not_signed() {
    let a = archive();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("release");
    let key = gpg().secret_key.to_str().unwrap().to_string();
    let (mut c, addr) = coordinator(a, &out, &["--signing-key", &key]);
    let url = format!("http://{addr}");
    let cache = d.path().join("cache");
    let root = a.root().to_str().unwrap();
    // "slow" holds one job while "fast" builds the others.
    let _slow = worker(
        "slow",
        &url,
        &cache,
        &["--once", "--iso-root", root, "--test-job-delay", "20s"],
    );
    wait_until("slow holds a job", LONG, || {
        status(&url, &[]).is_some_and(|s| {
            s["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|j| j["worker"] == "slow" && j["state"] == "leased")
        })
    });
    let _fast = worker("fast", &url, &cache, &["--once", "--iso-root", root]);
    wait_until("three kits are in place", LONG, || iuks_in(&out).len() == 3);
    assert!(c.poll().is_none(), "the release waits for slow");
    // Same size, one bit changed, after the coordinator verified it.
    let (name, _) = &iuks_in(&out)[0];
    let p = out.join(name);
    let mut bytes = fs::read(&p).unwrap();
    bytes[4096] ^= 1;
    fs::write(&p, bytes).unwrap();
    let code = code(&mut c);
    let log = c.log();
    assert_ne!(code, 0, "{log}");
    assert!(
        log.contains(&format!("{name} changed on disk after it was verified")),
        "{log}"
    );
    assert!(!out.join("manifest.json.asc").exists(), "nothing signed");
}

/// An ISO swapped at its path after the coordinator checked it changes
/// nothing: the coordinator hashed, serves and verifies against the file it
/// opened at the check. Before, the worker got the new file's bytes (and
/// refused them) or verification blamed an honest worker's kit.
#[test]
fn isos_swapped_after_their_check_change_nothing() {
    let a = archive();
    let d = tempfile::tempdir().unwrap();
    // An archive of links to the shared one: a rename over a link leaves
    // the shared file alone.
    let root = d.path().join("isos");
    let mut versions = vec![a.new_version().to_string()];
    versions.extend(a.sources().iter().cloned());
    for v in &versions {
        let rel = a.iso(v).strip_prefix(a.root()).unwrap().to_path_buf();
        fs::create_dir_all(root.join(&rel).parent().unwrap()).unwrap();
        fs::hard_link(a.iso(v), root.join(&rel)).unwrap();
    }
    let out = d.path().join("release");
    let key = gpg().secret_key.to_str().unwrap().to_string();
    let root_s = root.to_str().unwrap();
    let (mut c, addr) = coordinator(a, &out, &["--signing-key", &key, "--iso-root", root_s]);
    let url = format!("http://{addr}");
    wait_until("the ISOs are checked and hashed", LONG, || {
        status(&url, &[]).is_some_and(|s| s["state"] == "running")
    });
    // Every ISO's path now holds another release's ISO (renamed over it,
    // as a sync of the archive would).
    for (i, v) in versions.iter().enumerate() {
        let other = &versions[(i + 1) % versions.len()];
        let at = root.join(a.iso(v).strip_prefix(a.root()).unwrap());
        let tmp = at.with_extension("swap");
        fs::copy(a.iso(other), &tmp).unwrap();
        fs::rename(&tmp, &at).unwrap();
    }
    // The worker's own archive is the swapped one: it must see the
    // digests differ and fetch the ISOs from the coordinator.
    let cache = d.path().join("cache");
    let mut w = worker("w", &url, &cache, &["--once", "--iso-root", root_s]);
    assert_eq!(code(&mut c), 0, "{}", c.log());
    assert_eq!(code(&mut w), 0, "{}", w.log());
    assert_eq!(&iuks_in(&out), local_builds(), "0 wrong kits signed");
}

#[test]
fn listening_beyond_loopback_needs_tls_and_client_certificates() {
    let a = archive();
    let d = tempfile::tempdir().unwrap();
    let token = token_file(d.path(), "0123456789abcdef0123456789abcdef");
    let (cert, key) = iukfarm_tests::farm::tls_files(d.path());
    let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let signing = gpg().secret_key.to_str().unwrap().to_string();
    for (mut extra, why) in [
        (vec![], "without TLS"),
        (vec!["--token-file", token.to_str().unwrap()], "without TLS"),
        (
            vec!["--tls-cert", c, "--tls-key", k],
            "neither client certificates nor a token",
        ),
    ] {
        extra.extend(["--signing-key", &signing]);
        let out = d.path().join("out");
        let o = iukfarm_tests::farm::coordinator_cmd_for(
            a,
            a.new_version(),
            a.sources(),
            &out,
            "0.0.0.0:0",
            &extra,
        )
        .output()
        .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{e}");
        assert!(e.contains(why), "{extra:?}: {e}");
        assert!(!out.exists(), "a refused start writes nothing");
    }
}

#[test]
fn a_journal_append_on_a_full_disk_is_cut_back_and_the_next_one_is_whole() {
    use iukfarm_coordinator::journal::{Entry, Journal};
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("disk");
    let _disk = Tmpfs::mount(&dir, 1);
    let path = dir.join("journal");
    let entry = |n: usize| Entry {
        job: format!("job-{n}"),
        name: format!("Tails_amd64_6.{n}_to_7.0.iuk"),
        sha256: format!("{n:064x}"),
        size: 1 << 20,
        worker: "w".repeat(n % 7 + 1),
        build_seconds: 1.5,
        reproduction: false,
        certificate: None,
        retracted: false,
    };
    let (mut j, _) = Journal::open(&path).unwrap();
    // Up to the end of the journal's first page, so that the next line
    // straddles a page that the full disk cannot give.
    let line = |n| serde_json::to_vec(&entry(n)).unwrap().len() as u64 + 1;
    let mut n = 0;
    while fs::metadata(&path).unwrap().len() + line(n) <= 4096 {
        j.append(&entry(n)).unwrap();
        n += 1;
    }
    let whole = fs::metadata(&path).unwrap().len();
    assert!(whole < 4096 && whole + line(n) > 4096, "{whole}");
    let filler = fill(&dir, 0);
    let e = j.append(&entry(n)).expect_err("the disk is full");
    assert!(e.to_string().contains("No space left on device"), "{e}");
    assert_eq!(fs::metadata(&path).unwrap().len(), whole, "cut back");
    fs::remove_file(filler).unwrap();
    j.append(&entry(n)).unwrap();
    drop(j);
    let (_, entries) = Journal::open(&path).unwrap();
    assert_eq!(entries, (0..=n).map(entry).collect::<Vec<_>>());
}

/// Two releases of the shared archive copied, with what the RM vouches
/// for: `SHA256SUMS` and detached signatures by the test key.
fn vouched_archive(d: &Path) -> (Archive, std::path::PathBuf) {
    require_tool("gpg");
    let a = archive();
    let small = Archive {
        dir: tempfile::tempdir_in(d).unwrap(),
        versions: vec!["7.0".into(), "7.4".into()],
    };
    let mut sums = String::new();
    for v in &small.versions {
        let dst = small.iso(v);
        fs::create_dir_all(dst.parent().unwrap()).unwrap();
        fs::copy(a.iso(v), &dst).unwrap();
        sums.push_str(&format!(
            "{}  {}\n",
            sha256_file(&dst),
            dst.file_name().unwrap().to_str().unwrap()
        ));
        run(gpg()
            .cmd("gpg")
            .args(["--batch", "--yes", "--detach-sign", "--output"])
            .arg(dst.with_extension("iso.sig"))
            .arg(&dst));
    }
    gpg().kill_agent();
    let sums_file = d.join("SHA256SUMS");
    fs::write(&sums_file, sums).unwrap();
    (small, sums_file)
}

fn coordinator_on(small: &Archive, out: &Path, extra: &[&str]) -> std::process::Output {
    let key = gpg().secret_key.to_str().unwrap().to_string();
    Command::new(iukfarm())
        .arg("coordinator")
        .args(["--new-version", "7.4", "--source-versions", "7.0"])
        .args(["--source-date-epoch", SDE])
        .arg("--iso-root")
        .arg(small.root())
        .arg("--output-dir")
        .arg(out)
        .args(["--listen", "127.0.0.1:0", "--signing-key", &key])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn inputs_the_rm_does_not_vouch_for_are_refused_before_any_work() {
    let d = tempfile::tempdir().unwrap();
    let (small, sums) = vouched_archive(d.path());
    let cert = gpg().cert.to_str().unwrap().to_string();

    // A digest that differs (the RM's file, or the ISO, is not the release).
    let wrong = d.path().join("SHA256SUMS.wrong");
    let text = fs::read_to_string(&sums).unwrap();
    let first = text.lines().next().unwrap();
    let flipped = format!(
        "{}{}",
        if first.starts_with('0') { "1" } else { "0" },
        &first[1..]
    );
    fs::write(&wrong, text.replacen(first, &flipped, 1)).unwrap();
    let out = d.path().join("r1");
    let o = coordinator_on(&small, &out, &["--iso-sha256sums", wrong.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("tails-amd64-7.0.iso has sha256"), "{e}");
    assert!(iuks_in(&out).is_empty());

    // An ISO missing from the RM's file.
    let partial = d.path().join("SHA256SUMS.partial");
    fs::write(&partial, text.lines().nth(1).unwrap()).unwrap();
    let o = coordinator_on(
        &small,
        &d.path().join("r2"),
        &["--iso-sha256sums", partial.to_str().unwrap()],
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("tails-amd64-7.0.iso has no digest"), "{e}");

    // A signature of another file (the old ISO's signature on the new one).
    let new_sig = small.iso("7.4").with_extension("iso.sig");
    let saved = fs::read(&new_sig).unwrap();
    fs::copy(small.iso("7.0").with_extension("iso.sig"), &new_sig).unwrap();
    let o = coordinator_on(&small, &d.path().join("r3"), &["--iso-keyring", &cert]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("tails-amd64-7.4.iso is not signed by a key of"),
        "{e}"
    );
    // No signature at all: refused before reading any ISO.
    fs::remove_file(&new_sig).unwrap();
    let o = coordinator_on(&small, &d.path().join("r4"), &["--iso-keyring", &cert]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("no signature"), "{e}");
    fs::write(&new_sig, saved).unwrap();

    // A byte flipped in the old ISO's data: both checks catch it.
    let iso = small.iso("7.0");
    let mut bytes = fs::read(&iso).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    fs::write(&iso, bytes).unwrap();
    for flag in [
        ["--iso-sha256sums", sums.to_str().unwrap()],
        ["--iso-keyring", &cert],
    ] {
        let o = coordinator_on(&small, &d.path().join("r5"), &flag);
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{flag:?}: {e}");
        assert!(e.contains("tails-amd64-7.0.iso"), "{flag:?}: {e}");
    }
}

#[test]
fn build_is_held_to_the_coordinators_rules() {
    let d = tempfile::tempdir().unwrap();
    let (small, sums) = vouched_archive(d.path());
    let cert = gpg().cert.to_str().unwrap().to_string();
    let (old, new) = (small.iso("7.0"), small.iso("7.4"));
    let out_dir = d.path().join("out");
    fs::create_dir_all(&out_dir).unwrap();
    let build = |extra: &[&str]| {
        let mut c = Command::new(iukfarm());
        c.args(["build", "--quiet", "--old-iso"])
            .arg(&old)
            .arg("--new-iso")
            .arg(&new)
            .arg("--output-dir")
            .arg(&out_dir)
            .env_remove("SOURCE_DATE_EPOCH")
            .args(extra);
        c
    };
    let refused = |cmd: &mut Command, says: &str| {
        let o = cmd.output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{cmd:?}: {e}");
        assert!(e.contains(says), "{cmd:?}: {e}");
    };
    refused(
        &mut build(&["--source-date-epoch", SDE, "--gensquashfs", "1.3"]),
        "expected 1.2.0 or 1.3.2",
    );
    refused(
        &mut build(&["--source-date-epoch", SDE, "--new-version", "next"]),
        "pass --gensquashfs 1.3.2",
    );
    refused(
        &mut build(&["--source-date-epoch", SDE, "--product", "../../x"]),
        "invalid product",
    );
    refused(
        &mut build(&["--source-date-epoch", SDE, "--build-target", "x/y"]),
        "invalid build target",
    );
    refused(
        &mut build(&["--source-date-epoch", SDE, "--new-version", "7.4\n"]),
        "invalid version",
    );
    refused(
        &mut build(&["--source-date-epoch", SDE, "--threads", "100000"]),
        "threads",
    );
    refused(
        build(&[]).env("SOURCE_DATE_EPOCH", "yesterday"),
        "SOURCE_DATE_EPOCH",
    );
    let before = sha256_file(&old);
    let mut over_input = Command::new(iukfarm());
    over_input
        .args([
            "build",
            "--quiet",
            "--force",
            "--source-date-epoch",
            SDE,
            "--old-iso",
        ])
        .arg(&old)
        .arg("--new-iso")
        .arg(&new)
        .arg("--out")
        .arg(&old);
    refused(&mut over_input, "would overwrite the input");
    assert_eq!(sha256_file(&old), before);
    assert!(
        fs::read_dir(d.path())
            .unwrap()
            .all(|e| e.unwrap().file_name() != "x"),
        "nothing written outside the output directory"
    );

    // A build killed with SIGKILL left a part file; the next one removes it,
    // authenticates both ISOs, and writes the same bytes as ever, mode 0644.
    let name = "Tails_amd64_7.0_to_7.4.iuk";
    let stale = out_dir.join(format!(".{name}.Zk3q9a.part"));
    fs::write(&stale, b"half a kit").unwrap();
    run(&mut build(&[
        "--source-date-epoch",
        SDE,
        "--iso-sha256sums",
        sums.to_str().unwrap(),
        "--iso-keyring",
        &cert,
    ]));
    assert!(!stale.exists());
    let kit = out_dir.join(name);
    assert_eq!(
        sha256_file(&kit),
        local_builds().iter().find(|(n, _)| n == name).unwrap().1
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&kit).unwrap().permissions().mode() & 0o777,
        0o644
    );
    let left: Vec<_> = fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, [name], "only the kit");
}

/// `iukfarm ca` in `dir`: the CA, the coordinator's certificate for
/// localhost, and client certificates `(name, role)`.
fn release_ca(dir: &Path, clients: &[(&str, &str)]) {
    run(Command::new(iukfarm())
        .args(["ca", "init", "--dir"])
        .arg(dir));
    run(Command::new(iukfarm())
        .args(["ca", "issue", "--role", "coordinator", "localhost"])
        .args(["--host", "localhost", "--host", "127.0.0.1", "--dir"])
        .arg(dir));
    for (name, role) in clients {
        run(Command::new(iukfarm())
            .args(["ca", "issue", "--role", role, name, "--dir"])
            .arg(dir));
    }
}

#[test]
fn certificates_say_who_is_who() {
    let a = archive();
    let d = tempfile::tempdir().unwrap();
    let ca = d.path().join("ca");
    release_ca(
        &ca,
        &[
            ("w1", "worker"),
            ("w2", "worker"),
            ("evil", "worker"),
            ("revoked", "worker"),
            ("rm", "rm"),
            ("dash", "reader"),
        ],
    );
    // Issuing over an existing certificate is refused; the key stays private.
    let o = Command::new(iukfarm())
        .args(["ca", "issue", "--role", "rm", "w1", "--dir"])
        .arg(&ca)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    use std::os::unix::fs::PermissionsExt;
    for k in ["ca.key", "issued/w1.key"] {
        let mode = fs::metadata(ca.join(k)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{k}");
    }
    run(Command::new(iukfarm())
        .args(["ca", "revoke", "revoked", "--dir"])
        .arg(&ca));

    let out = d.path().join("release");
    let key = gpg().secret_key.to_str().unwrap().to_string();
    let p = |f: &str| ca.join(f).to_str().unwrap().to_string();
    let (mut c, addr) = coordinator(
        a,
        &out,
        &[
            "--signing-key",
            &key,
            "--tls-cert",
            &p("issued/localhost.pem"),
            "--tls-key",
            &p("issued/localhost.key"),
            "--tls-client-ca",
            &p("ca.pem"),
            "--tls-revoked",
            &p("revoked"),
            "--reproduce",
            "1",
            "--linger",
            "60s",
        ],
    );
    let port = addr.rsplit(':').next().unwrap();
    let url = format!("https://localhost:{port}");
    let client = |who: Option<&str>, args: &[&str]| {
        let mut cmd = Command::new(iukfarm());
        cmd.args(args)
            .args(["--coordinator", &url, "--tls-ca", &p("ca.pem")]);
        if let Some(w) = who {
            cmd.args([
                "--tls-cert",
                &p(&format!("issued/{w}.pem")),
                "--tls-key",
                &p(&format!("issued/{w}.key")),
            ]);
        }
        cmd.output().unwrap()
    };
    let refused = |o: std::process::Output, says: &str| {
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert!(e.contains(says), "{says:?}: {e}");
    };
    refused(client(None, &["status"]), "requires a client certificate");
    refused(client(Some("w1"), &["status"]), "may not read the status");
    refused(client(Some("dash"), &["cancel"]), "may not cancel");
    assert!(client(Some("dash"), &["status"]).status.success());

    let cache = d.path().join("cache");
    let root = a.root().to_str().unwrap();
    let tls = |w: &str| {
        vec![
            "--tls-ca".to_string(),
            p("ca.pem"),
            "--tls-cert".to_string(),
            p(&format!("issued/{w}.pem")),
            "--tls-key".to_string(),
            p(&format!("issued/{w}.key")),
        ]
    };
    let args = |w: &str, extra: &[&str]| {
        let mut v: Vec<String> = tls(w);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let mut gone = worker(
        "revoked",
        &url,
        &cache,
        &args("revoked", &["--once"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(code(&mut gone), 2, "{}", gone.log());
    assert!(gone.log().contains("is revoked"), "{}", gone.log());

    // The reproduction must run under the other certificate.
    let w1_args = args("w1", &["--once", "--iso-root", root]);
    let w2_args = args(
        "w2",
        &["--once", "--iso-root", root, "--test-job-delay", "2s"],
    );
    let mut w1 = worker(
        "w1",
        &url,
        &cache,
        &w1_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut w2 = worker(
        "w2",
        &url,
        &cache,
        &w2_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );

    // Another worker's certificate cannot use w1's id.
    let rm_status = || {
        let o = client(Some("rm"), &["status", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&o.stdout).ok()
    };
    let mut w1_id = String::new();
    wait_until("w1 registered", LONG, || {
        rm_status().is_some_and(|s| {
            s["workers"].as_array().unwrap().iter().any(|w| {
                if w["name"] == "w1" {
                    w1_id = w["id"].as_str().unwrap().to_string();
                    true
                } else {
                    false
                }
            })
        })
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut evil = iukfarm_proto::connect(&ClientConfig {
            url: url.clone(),
            tls_ca: Some(fs::read(ca.join("ca.pem")).unwrap()),
            identity: Some((
                fs::read(ca.join("issued/evil.pem")).unwrap(),
                fs::read(ca.join("issued/evil.key")).unwrap(),
            )),
            token: None,
        })
        .await
        .unwrap();
        let e = evil
            .heartbeat(v1::HeartbeatRequest {
                worker_id: w1_id.clone(),
                jobs: vec![],
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        // Nor put or get blocks under it.
        let block = v1::BlockRef {
            settings: vec![1; 32],
            len: 4096,
            data_sha256: vec![2; 32],
        };
        let e = evil
            .put_block(v1::PutBlockRequest {
                worker_id: w1_id.clone(),
                block: Some(block.clone()),
                uncompressed: false,
                compressed: vec![0xFD; 100],
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        let e = evil
            .get_block(v1::GetBlockRequest {
                worker_id: w1_id.clone(),
                block: Some(block.clone()),
                unless_busy: false,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        // Claiming w1's name registers "evil": the certificate decides.
        let fp = iukfarm_engine::fingerprint::fingerprint();
        let evil_id = evil
            .register(v1::RegisterRequest {
                protocol: PROTOCOL_VERSION,
                name: "w1".into(),
                fingerprint: Some(v1::Fingerprint {
                    engine_version: fp.engine_version,
                    git_commit: fp.git_commit,
                    liblzma_version: fp.liblzma_version,
                    iuk_format: fp.iuk_format,
                    gensquashfs: fp.gensquashfs.clone(),
                }),
                slots: 1,
                memory_bytes: 1 << 30,
            })
            .await
            .unwrap()
            .into_inner()
            .worker_id;
        let e = evil.cancel(v1::CancelRequest::default()).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        // A second certificate under w1's name (the CA issued it again): not
        // w1 while w1 is connected, and w1's id is not its.
        for ext in ["pem", "key"] {
            let issued = ca.join("issued");
            fs::rename(
                issued.join(format!("w1.{ext}")),
                issued.join(format!("w1-first.{ext}")),
            )
            .unwrap();
        }
        run(Command::new(iukfarm())
            .args(["ca", "issue", "--role", "worker", "w1", "--dir"])
            .arg(&ca));
        let mut twin = iukfarm_proto::connect(&ClientConfig {
            url: url.clone(),
            tls_ca: Some(fs::read(ca.join("ca.pem")).unwrap()),
            identity: Some((
                fs::read(ca.join("issued/w1.pem")).unwrap(),
                fs::read(ca.join("issued/w1.key")).unwrap(),
            )),
            token: None,
        })
        .await
        .unwrap();
        let fp = iukfarm_engine::fingerprint::fingerprint();
        let e = twin
            .register(v1::RegisterRequest {
                protocol: PROTOCOL_VERSION,
                name: "w1".into(),
                fingerprint: Some(v1::Fingerprint {
                    engine_version: fp.engine_version.clone(),
                    git_commit: fp.git_commit.clone(),
                    liblzma_version: fp.liblzma_version.clone(),
                    iuk_format: fp.iuk_format,
                    gensquashfs: fp.gensquashfs.clone(),
                }),
                slots: 1,
                memory_bytes: 1 << 30,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("another certificate"), "{e:?}");
        let e = twin
            .heartbeat(v1::HeartbeatRequest {
                worker_id: w1_id.clone(),
                jobs: vec![],
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        // Under its own id: a malformed block id, a form that is both
        // compressed and not, then a form that is not the block it names.
        let e = evil
            .get_block(v1::GetBlockRequest {
                worker_id: evil_id.clone(),
                block: Some(v1::BlockRef {
                    settings: vec![1; 5],
                    ..block.clone()
                }),
                unless_busy: false,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let e = evil
            .put_block(v1::PutBlockRequest {
                worker_id: evil_id.clone(),
                block: Some(block.clone()),
                uncompressed: true,
                compressed: vec![0xFD; 100],
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let r = evil
            .put_block(v1::PutBlockRequest {
                worker_id: evil_id.clone(),
                block: Some(block.clone()),
                uncompressed: false,
                compressed: vec![0xFD; 100],
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!r.accepted);

        // Work sharing: not under w1's id; not a block that is not the
        // block its id names, nor settings out of bounds; not for a lease
        // that is not its own; and no more blocks to compress once it sent
        // a wrong one.
        let e = evil
            .take_blocks(v1::TakeBlocksRequest {
                worker_id: w1_id.clone(),
                max_blocks: 1,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        let e = evil
            .offer_blocks(v1::OfferBlocksRequest {
                worker_id: w1_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        let xz = XzConfig::for_block_size(1 << 20);
        let data = vec![7u8; 4096];
        let id = BlockId::new(&xz, &data);
        let settings = v1::XzSettings {
            level: xz.level,
            dict_size: xz.dict_size,
            lc: xz.lc,
            lp: xz.lp,
            pb: xz.pb,
            flags: xz.flags,
        };
        let offer = |data: Vec<u8>, xz: v1::XzSettings| v1::OfferBlocksRequest {
            worker_id: evil_id.clone(),
            lease_id: "lease-of-someone-else".into(),
            xz: Some(xz),
            blocks: vec![v1::OfferedBlock {
                block: Some(v1::BlockRef {
                    settings: id.settings.to_vec(),
                    len: id.len,
                    data_sha256: id.data.to_vec(),
                }),
                data,
            }],
        };
        let e = evil
            .offer_blocks(offer(vec![8u8; 4096], settings))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let huge = v1::XzSettings {
            dict_size: 1 << 30,
            ..settings
        };
        let e = evil
            .offer_blocks(offer(data.clone(), huge))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let e = evil
            .offer_blocks(offer(data.clone(), settings))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        let e = evil
            .take_blocks(v1::TakeBlocksRequest {
                worker_id: evil_id.clone(),
                max_blocks: 1,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    });
    wait_until("the release is over", LONG, || {
        rm_status().is_some_and(|s| s["state"] == "succeeded")
    });
    let s = rm_status().unwrap();
    let evil = (s["workers"].as_array().unwrap().iter())
        .find(|w| w["name"] == "evil")
        .unwrap();
    assert_eq!(evil["bad_blocks"], 1, "{s}");
    assert!(client(Some("rm"), &["cancel"]).status.success());

    assert_eq!(code(&mut c), 0, "{}", c.log());
    assert_eq!(code(&mut w1), 0, "{}", w1.log());
    assert_eq!(code(&mut w2), 0, "{}", w2.log());
    assert_eq!(&iuks_in(&out), local_builds());
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let mut twins = 0;
    // Each kit names the certificate it came with: one per worker.
    let mut certs = std::collections::BTreeMap::new();
    for k in m["iuks"].as_array().unwrap() {
        let w = k["worker"].as_str().unwrap();
        assert!(w == "w1" || w == "w2", "{m}");
        let cert = k["certificate"].as_str().unwrap_or_default();
        assert!(
            cert.len() == 64 && cert.bytes().all(|b| b.is_ascii_hexdigit()),
            "{m}"
        );
        assert_eq!(*certs.entry(w).or_insert(cert), cert, "{m}");
        if let Some(r) = k["reproduced_by"].as_str() {
            assert_ne!(r, w, "{m}");
            twins += 1;
        }
    }
    assert_eq!(twins, 1, "{m}");
    assert!(
        c.log().contains("evil used the worker id of w1"),
        "{}",
        c.log()
    );
}

/// Numbers and names that would reach a library or another program as
/// something else are refused at the command line, before anything is
/// written: a CA's validity far beyond any date (rcgen panicked, leaving a
/// half-made CA), a publish host that ssh would take for an option.
/// Revocation acts at once on what is open: a worker revoked in the middle
/// of its upload loses the upload and its job (nothing it sent is kept),
/// and a revoked reader's watch ends, without waiting for either to call
/// again.
#[test]
fn a_revoked_worker_loses_its_upload_and_a_revoked_reader_its_watch() {
    let a = archive();
    let d = tempfile::tempdir().unwrap();
    let ca = d.path().join("ca");
    release_ca(
        &ca,
        &[("w1", "worker"), ("w2", "worker"), ("dash", "reader")],
    );
    let out = d.path().join("release");
    let key = gpg().secret_key.to_str().unwrap().to_string();
    let p = |f: &str| ca.join(f).to_str().unwrap().to_string();
    let (mut c, addr) = coordinator(
        a,
        &out,
        &[
            "--signing-key",
            &key,
            "--tls-cert",
            &p("issued/localhost.pem"),
            "--tls-key",
            &p("issued/localhost.key"),
            "--tls-client-ca",
            &p("ca.pem"),
            "--tls-revoked",
            &p("revoked"),
        ],
    );
    let url = format!("https://localhost:{}", addr.rsplit(':').next().unwrap());
    let tls = |who: &str| {
        vec![
            "--tls-ca".to_string(),
            p("ca.pem"),
            "--tls-cert".to_string(),
            p(&format!("issued/{who}.pem")),
            "--tls-key".to_string(),
            p(&format!("issued/{who}.key")),
        ]
    };
    let mut watch = Proc::spawn(
        "watch",
        Command::new(iukfarm())
            .args(["watch", "--plain", "--coordinator", &url])
            .args(tls("dash")),
    );
    let cache = d.path().join("cache");
    let root = a.root().to_str().unwrap().to_string();
    // w1 stalls its first upload after one chunk: revoked there.
    let mut w1_args = tls("w1");
    w1_args
        .extend(["--once", "--iso-root", &root, "--test-upload-pause", "600s"].map(String::from));
    let mut w1 = worker(
        "w1",
        &url,
        &cache,
        &w1_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    w1.wait_log("upload paused", LONG);
    for who in ["w1", "dash"] {
        run(Command::new(iukfarm())
            .args(["ca", "revoke", who, "--dir"])
            .arg(&ca));
    }
    // Both end long before w1's pause would: the watch with an error,
    // w1 refused when it registers again.
    let watched = watch.wait(LONG);
    assert_eq!(watched.code(), Some(1), "{}", watch.log());
    assert!(watch.log().contains("revoked"), "{}", watch.log());
    assert_eq!(code(&mut w1), 2, "{}", w1.log());
    assert!(c.poll().is_none(), "the release waits for another worker");
    let mut w2_args = tls("w2");
    w2_args.extend(["--once", "--iso-root", &root].map(String::from));
    let mut w2 = worker(
        "w2",
        &url,
        &cache,
        &w2_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(code(&mut c), 0, "{}", c.log());
    assert_eq!(code(&mut w2), 0, "{}", w2.log());
    assert!(c.log().contains("revoked"), "{}", c.log());
    assert_eq!(&iuks_in(&out), local_builds(), "0 bytes lost");
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let workers: Vec<&str> = (manifest["iuks"].as_array().unwrap().iter())
        .map(|k| k["worker"].as_str().unwrap())
        .collect();
    assert!(
        workers.iter().all(|w| *w == "w2"),
        "nothing of w1 kept: {workers:?}"
    );
}

/// Load that must not lock the RM out: 300 idle connections from one
/// host (more than the coordinator's 256) and 32 reader watches (the old
/// global cap) while the RM asks for the status and watches. Before, the
/// RM's `status` timed out behind the idle connections and readers could
/// take every watch.
#[test]
fn idle_connections_and_reader_watches_do_not_lock_the_rm_out() {
    let a = archive();
    let d = tempfile::tempdir().unwrap();
    let ca = d.path().join("ca");
    release_ca(&ca, &[("rm", "rm"), ("dash", "reader")]);
    let out = d.path().join("release");
    let key = gpg().secret_key.to_str().unwrap().to_string();
    let p = |f: &str| ca.join(f).to_str().unwrap().to_string();
    // No workers: the release stays running.
    let (_c, addr) = coordinator(
        a,
        &out,
        &[
            "--signing-key",
            &key,
            "--tls-cert",
            &p("issued/localhost.pem"),
            "--tls-key",
            &p("issued/localhost.key"),
            "--tls-client-ca",
            &p("ca.pem"),
        ],
    );
    let port = addr.rsplit(':').next().unwrap().to_string();
    let url = format!("https://localhost:{port}");
    let client = |who: &str| ClientConfig {
        url: url.clone(),
        tls_ca: Some(fs::read(ca.join("ca.pem")).unwrap()),
        identity: Some((
            fs::read(ca.join(format!("issued/{who}.pem"))).unwrap(),
            fs::read(ca.join(format!("issued/{who}.key"))).unwrap(),
        )),
        token: None,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // 300 connections from 127.0.0.2 that never send a byte.
        let target: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut idle = Vec::new();
        for _ in 0..300 {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            if let Ok(c) = s.connect(target).await {
                idle.push(c);
            }
        }
        // A reader's watches: some, not all of them.
        let reader = iukfarm_proto::connect(&client("dash")).await.unwrap();
        let (mut open, mut refused) = (Vec::new(), 0);
        for _ in 0..32 {
            match reader.clone().watch(v1::StatusRequest {}).await {
                Ok(r) => open.push(r.into_inner()),
                Err(e) => {
                    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                    refused += 1;
                }
            }
        }
        assert_eq!((open.len(), refused), (24, 8));
        // The RM: a status (a process of its own, as the RM runs it) and a
        // watch, answered at once.
        let t = Instant::now();
        let args: Vec<String> = [
            "status",
            "--coordinator",
            &url,
            "--tls-ca",
            &p("ca.pem"),
            "--tls-cert",
            &p("issued/rm.pem"),
            "--tls-key",
            &p("issued/rm.key"),
        ]
        .map(String::from)
        .to_vec();
        let o = tokio::task::spawn_blocking(move || {
            Command::new(iukfarm()).args(args).output().unwrap()
        })
        .await
        .unwrap();
        let status_took = t.elapsed();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let t = Instant::now();
        let mut rm = iukfarm_proto::connect(&client("rm")).await.unwrap();
        let mut w = rm.watch(v1::StatusRequest {}).await.unwrap().into_inner();
        assert!(w.message().await.unwrap().is_some());
        let watch_took = t.elapsed();
        eprintln!("under load: the RM's status took {status_took:?}, its watch {watch_took:?}");
        // Loose bounds (a loaded machine); the figures are in the output.
        assert!(status_took < Duration::from_secs(10), "{status_took:?}");
        assert!(watch_took < Duration::from_secs(10), "{watch_took:?}");
        // Every idle connection is closed by the coordinator: over the
        // address's cap at once, the others when their handshake time ends.
        for mut c in idle {
            let mut b = [0u8; 1];
            let r = tokio::time::timeout(
                Duration::from_secs(120),
                tokio::io::AsyncReadExt::read(&mut c, &mut b),
            )
            .await
            .expect("an idle connection left open");
            assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        }
    });
}

#[test]
fn out_of_range_days_and_option_like_hosts_are_refused_up_front() {
    let d = tempfile::tempdir().unwrap();
    let ca = d.path().join("ca");
    for (days, args) in [
        ("4294967295", &["ca", "init", "--days"][..]),
        ("0", &["ca", "init", "--days"]),
        ("36501", &["ca", "init", "--days"]),
    ] {
        let o = Command::new(iukfarm())
            .args(args)
            .arg(days)
            .arg("--dir")
            .arg(&ca)
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{days}: {e}");
        assert!(e.contains("from 1 to 36500"), "{days}: {e}");
        assert!(!ca.exists(), "{days}: a half-made CA was left");
    }
    run(Command::new(iukfarm())
        .args(["ca", "init", "--days", "36500", "--dir"])
        .arg(&ca));
    let o = Command::new(iukfarm())
        .args([
            "ca", "issue", "--role", "worker", "w1", "--days", "99999", "--dir",
        ])
        .arg(&ca)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(!ca.join("issued/w1.pem").exists());

    let marker = d.path().join("ssh-ran");
    for host in [
        format!("-oProxyCommand=touch {}", marker.display()),
        "-p2222".to_string(),
        "host:/srv".to_string(),
        "a b".to_string(),
    ] {
        let o = Command::new(iukfarm())
            .arg("publish")
            .arg(d.path())
            .args([
                "--cert",
                "c.asc",
                "--rm-sums",
                "s",
                "--staging-dir",
                "/srv/tmp",
            ])
            .arg(format!("--host={host}"))
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{host}: {e}");
        assert!(e.contains("is not a host"), "{host}: {e}");
    }
    assert!(!marker.exists());
}
