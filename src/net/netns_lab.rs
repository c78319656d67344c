//! The network-namespace lab the DHCP tests share (net::netns_test, net::dhcp6::netns_test):
//! two namespaces joined by a veth pair (`veth0` in the server's, `eth0` in the client's), a
//! scratch directory, processes started in a namespace with `ip netns exec` and their output
//! in a log file there, and this test binary re-executed in a namespace to run one ignored
//! child test, whose last word is a `CHILD-OK key=value ...` line.
//!
//! Everything the lab makes goes away when it is dropped, whatever happened: its processes
//! are killed, its namespaces deleted (the veth pair with them), then the directories it was
//! told to remove and the scratch directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::testing;

pub(in crate::net) fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

/// Why a lab cannot be built here (not root, no `ip`), if it cannot.
pub(in crate::net) fn missing() -> Option<String> {
    if let Some(why) = testing::needs_root() {
        return Some(why);
    }
    if find_program("ip").is_none() {
        return Some("`ip` (iproute2) is not installed".into());
    }
    None
}

/// `ip ARGS`; its stdout, or an error with the command and its stderr.
pub(in crate::net) fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value of `key` in the `CHILD-OK key=value ...` line of a child test's output.
pub(in crate::net) fn report_field(output: &str, key: &str) -> String {
    let report = output.lines().find_map(|l| l.split_once("CHILD-OK ").map(|(_, r)| r)).expect("report line");
    report
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {report}"))
        .to_string()
}

/// Two namespaces joined by a veth pair, and the processes started in them.
pub(in crate::net) struct Lab {
    pub server_ns: String,
    pub client_ns: String,
    /// The scratch directory: logs, dnsmasq's lease file.
    pub dir: PathBuf,
    /// Set to "1" in the environment of every process the lab starts.
    child_env: &'static str,
    children: Vec<Child>,
    made: Vec<String>,
    /// More directories to remove at the end (after the namespaces are gone).
    remove: Vec<PathBuf>,
}

impl Lab {
    /// A lab whose names end in this process's id: namespaces `SERVER-ID` and `CLIENT-ID`,
    /// scratch directory `DIR-ID` in the temporary directory. Nothing is made yet.
    pub fn new(server: &str, client: &str, dir: &str, child_env: &'static str) -> Lab {
        let id = std::process::id();
        Lab {
            server_ns: format!("{server}-{id}"),
            client_ns: format!("{client}-{id}"),
            dir: std::env::temp_dir().join(format!("{dir}-{id}")),
            child_env,
            children: Vec::new(),
            made: Vec::new(),
            remove: Vec::new(),
        }
    }

    /// Remove `dir` when the lab goes away.
    pub fn remove_at_end(&mut self, dir: PathBuf) {
        self.remove.push(dir);
    }

    /// The scratch directory, the namespaces, the veth pair (veth0 in the server's, eth0 in
    /// the client's, left down), `addr add ADDRESS dev veth0 FLAGS...` and the server's links
    /// up.
    /// Where no namespace can be made at all (not root, an unprivileged container), `test`
    /// cannot run here: that is said (see [`testing::cannot_run`]) and the answer is false;
    /// any other failure panics.
    pub fn build_or_skip(&mut self, test: &str, address: &str, flags: &[&str]) -> bool {
        match self.build(address, flags) {
            Ok(()) => true,
            Err(e) if self.made.is_empty() => {
                testing::cannot_run(test, &format!("cannot make a network namespace: {e}"));
                false
            }
            Err(e) => panic!("{e}"),
        }
    }

    fn build(&mut self, address: &str, flags: &[&str]) -> Result<(), String> {
        let _ = fs::remove_dir_all(&self.dir);
        fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        for ns in [self.server_ns.clone(), self.client_ns.clone()] {
            run(&["netns", "add", &ns])?;
            self.made.push(ns);
        }
        let (s, c) = (self.server_ns.as_str(), self.client_ns.as_str());
        run(&["-n", s, "link", "add", "veth0", "type", "veth", "peer", "name", "eth0", "netns", c])?;
        run(&[&["-n", s, "addr", "add", address, "dev", "veth0"], flags].concat())?;
        run(&["-n", s, "link", "set", "veth0", "up"])?;
        run(&["-n", s, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Start `program` in namespace `ns`, its stdout and stderr into the scratch file `log`.
    pub fn spawn(&mut self, ns: &str, program: &[&str], log: &str) -> Result<(), String> {
        let path = self.dir.join(log);
        let out = fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(program)
            .env(self.child_env, "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", program[0]))?;
        self.children.push(child);
        Ok(())
    }

    /// dnsmasq in the server's namespace, on veth0 only, logging to `dnsmasq.log` (its lease
    /// file is `leases` in the scratch directory), with the test's own `args`; up once its
    /// log says `ready` (it has its sockets), within 5 seconds.
    pub fn start_dnsmasq(&mut self, dnsmasq: &Path, args: &[&str], ready: &str) -> Result<(), String> {
        let leases = format!("--dhcp-leasefile={}", self.dir.join("leases").display());
        let pid = format!("--pid-file={}", self.dir.join("dnsmasq.pid").display());
        let common = [
            dnsmasq.to_str().ok_or("dnsmasq's path is not UTF-8")?,
            "--keep-in-foreground",
            "--conf-file",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            "--interface=veth0",
            "--bind-interfaces",
            "--log-facility=-",
            &leases,
            &pid,
        ];
        let server_ns = self.server_ns.clone();
        self.spawn(&server_ns, &[&common, args].concat(), "dnsmasq.log")?;
        self.wait_for("dnsmasq.log", ready, Duration::from_secs(5))
    }

    /// Start this test binary in namespace `ns`, running only the ignored test `test`.
    pub fn spawn_test(&mut self, ns: &str, test: &str, log: &str) -> Result<(), String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let exe = exe.to_str().ok_or("the test binary's path is not UTF-8")?.to_string();
        let args = [exe.as_str(), "--exact", test, "--ignored", "--nocapture", "--test-threads=1"];
        self.spawn(ns, &args, log)
    }

    /// The scratch file `name`; empty if it cannot be read.
    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    /// Wait until `log` contains `text`, or the last process started exits.
    pub fn wait_for(&mut self, log: &str, text: &str, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.log(log).contains(text) {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.children.last_mut().map(|c| c.try_wait()) {
                return Err(format!("{log}: exited ({status}):\n{}", self.log(log)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("{log}: no '{text}' within {limit:?}:\n{}", self.log(log)))
    }

    /// Run the child test `test` in the client namespace, within `limit`; its output (in
    /// `client.log`) when it passed and said `CHILD-OK`.
    pub fn run_child(&mut self, test: &str, limit: Duration) -> Result<String, String> {
        let client_ns = self.client_ns.clone();
        self.spawn_test(&client_ns, test, "client.log")?;
        let start = Instant::now();
        let child = self.children.last_mut().ok_or("no child")?;
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                break Some(status);
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let output = self.log("client.log");
        match status {
            Some(s) if s.success() && output.contains("CHILD-OK") => Ok(output),
            Some(s) => Err(format!("the child test {test} failed ({s}):\n{output}")),
            None => Err(format!("the child test {test} timed out after {limit:?}:\n{output}")),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting a namespace destroys the veth pair with it.
        for ns in self.made.drain(..).rev() {
            if let Err(e) = run(&["netns", "del", &ns]) {
                eprintln!("cleanup: {e}");
            }
        }
        for dir in self.remove.drain(..) {
            let _ = fs::remove_dir_all(dir);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
