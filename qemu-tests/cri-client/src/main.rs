//! A test client of containerd's CRI, driving a pod through the calls kubelet makes. It is a
//! QEMU test's tool, not part of berth: the `cri_pod_lifecycle` case puts this static binary in
//! an image of the tests' registry and runs it as a superpowered host container (the host's
//! network, the host's `/` at `/.berth/rootfs`).
//!
//! `cri-client lifecycle SANDBOX_IMAGE IMAGE`: what kubelet does for one pod, each step checked,
//! one `cri: ...` line per step on stdout and `cri: lifecycle ok` at the end (or
//! `cri: FAILED ...`). Then it sleeps, so the supervisor does not run it again.
//!
//! 1. waits for the CRI socket, `Version`;
//! 2. installs a bridge CNI network in `/etc/cni/net.d` (as a cluster's network add-on does)
//!    and waits for `Status` to report `NetworkReady`;
//! 3. `PullImage` IMAGE; `RunPodSandbox` (containerd runs SANDBOX_IMAGE, its config's
//!    `sandbox_image`), in cgroup `/kubepods/besteffort/pod<UID>`; `PodSandboxStatus` gives the
//!    pod's IP;
//! 4. `CreateContainer`, `StartContainer` of IMAGE running `cri-client serve 8080`;
//!    `ContainerStatus` says running; the pod's cgroup exists;
//! 5. the pod answers on its IP from the host's network (across the bridge);
//! 6. the container's log file has the CRI format line of its output;
//! 7. `ExecSync` gets stdout and exit status; a second one prints the process's capability
//!    sets and rlimits (`cri: proc: ...`, from the base spec settings.oci-defaults renders);
//! 8. `StopContainer`, `RemoveContainer`, `StopPodSandbox`, `RemovePodSandbox`; the pod is no
//!    longer listed and its IP is released.
//!
//! `cri-client serve PORT`: the pod's process. Prints `serving on PORT`, answers every TCP
//! connection with `hello from pod HOSTNAME`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// The host's `/` as a superpowered host container sees it.
const HOST: &str = "/.berth/rootfs";
const SOCKET: &str = "/run/containerd/containerd.sock";
const CNI_CONF: &str = "/etc/cni/net.d/10-berth-test.conflist";
const CNI_NET: &str = "berth-test";
const SUBNET: &str = "10.88.0.0/16";
const POD_NAME: &str = "cri-test";
const POD_UID: &str = "4f1c2e2a-berth-cri-test";
const POD_NS: &str = "default";
const PORT: u16 = 8080;

type Res<T> = Result<T, String>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["serve", port] => serve(port),
        ["lifecycle", sandbox, image] => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let outcome = rt.block_on(lifecycle(sandbox, image));
            // Not part of the CRI: the host's IPv6 addresses, which the QEMU case checks for
            // SLAAC (printed last, when the boot is long past).
            println!("cri: host ipv6: {}", host_ipv6().join(", "));
            match outcome {
                Ok(()) => println!("cri: lifecycle ok"),
                Err(e) => println!("cri: FAILED {e}"),
            }
            // The supervisor would run a host container that exits again; stay.
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        _ => {
            eprintln!("usage: cri-client lifecycle SANDBOX_IMAGE IMAGE | cri-client serve PORT");
            std::process::exit(2);
        }
    }
}

fn serve(port: &str) {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let l = TcpListener::bind(("0.0.0.0", port.parse().expect("a port number"))).expect("bind");
    println!("serving on {port}");
    for mut c in l.incoming().flatten() {
        let _ = writeln!(c, "hello from pod {}", host.trim());
    }
}

fn host_path(p: &str) -> PathBuf {
    Path::new(HOST).join(p.trim_start_matches('/'))
}

fn step(name: &str, detail: impl std::fmt::Display) {
    println!("cri: {name} ok: {detail}");
}

async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Res<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Res<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "not yet".to_string(),
            Err(e) => e,
        };
        if Instant::now() > deadline {
            return Err(format!("{what}: timed out after {timeout:?}; last: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `ExecSync` of `/bin/sh -c SCRIPT` in container `ctr`, within 30 seconds.
async fn exec_sh(
    rt: &mut RuntimeServiceClient<Channel>,
    ctr: &str,
    script: &str,
) -> Result<cri::ExecSyncResponse, tonic::Status> {
    let cmd = vec!["/bin/sh".into(), "-c".into(), script.into()];
    let req = cri::ExecSyncRequest { container_id: ctr.into(), cmd, timeout: 30 };
    Ok(rt.exec_sync(req).await?.into_inner())
}

async fn connect() -> Res<Channel> {
    let path = host_path(SOCKET);
    poll("the CRI socket", Duration::from_secs(180), || {
        let path = path.clone();
        async move {
            let ep = Endpoint::try_from("http://[::]:50051").map_err(|e| e.to_string())?;
            let ch = ep
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
                    }
                }))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            Ok(Some(ch))
        }
    })
    .await
}

fn cni_config() -> String {
    format!(
        r#"{{
  "cniVersion": "1.0.0",
  "name": "{CNI_NET}",
  "plugins": [
    {{"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
      "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{SUBNET}"}}]], "routes": [{{"dst": "0.0.0.0/0"}}]}}}}
  ]
}}
"#
    )
}

fn sandbox_config() -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: POD_NAME.into(),
            uid: POD_UID.into(),
            namespace: POD_NS.into(),
            attempt: 0,
        }),
        hostname: POD_NAME.into(),
        log_directory: format!("/var/log/pods/{POD_NS}_{POD_NAME}_{POD_UID}"),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: format!("/kubepods/besteffort/pod{POD_UID}"),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Pod as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ipc: cri::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The host's IPv6 addresses, as `IFACE ADDR/PREFIX SCOPE`
/// (from /proc/net/if_inet6 of the host's network, which a superpowered container shares).
fn host_ipv6() -> Vec<String> {
    let text = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (hex, prefix, scope, name) = (f.first()?, f.get(2)?, f.get(3)?, f.get(5)?);
            let bytes: Vec<u16> =
                (0..8).filter_map(|i| u16::from_str_radix(hex.get(i * 4..i * 4 + 4)?, 16).ok()).collect();
            let a = std::net::Ipv6Addr::from(<[u16; 8]>::try_from(bytes).ok()?);
            let scope = match *scope {
                "00" => "global",
                "20" => "link",
                "10" => "host",
                other => other,
            };
            Some(format!("{name} {a}/{} {scope}", u8::from_str_radix(prefix, 16).unwrap_or(0)))
        })
        .collect()
}

async fn lifecycle(sandbox_image: &str, image: &str) -> Res<()> {
    let ch = connect().await?;
    let mut rt = RuntimeServiceClient::new(ch.clone());
    let mut img = ImageServiceClient::new(ch);
    let e = |what: &'static str| move |s: tonic::Status| format!("{what}: {} ({:?})", s.message(), s.code());

    let v =
        rt.version(cri::VersionRequest { version: "v1".into() }).await.map_err(e("Version"))?.into_inner();
    step("Version", format!("{} {} (CRI {})", v.runtime_name, v.runtime_version, v.runtime_api_version));

    // The network add-on's part: a CNI config; containerd picks it up and reports the network ready.
    let conf = host_path(CNI_CONF);
    std::fs::create_dir_all(conf.parent().unwrap()).map_err(|x| format!("mkdir {}: {x}", conf.display()))?;
    std::fs::write(&conf, cni_config()).map_err(|x| format!("write {}: {x}", conf.display()))?;
    let rt2 = rt.clone();
    poll("NetworkReady", Duration::from_secs(60), || {
        let mut rt = rt2.clone();
        async move {
            let st =
                rt.status(cri::StatusRequest { verbose: false }).await.map_err(e("Status"))?.into_inner();
            let conds = st.status.map(|s| s.conditions).unwrap_or_default();
            let net = conds.iter().find(|c| c.r#type == "NetworkReady");
            match net {
                Some(c) if c.status => Ok(Some(())),
                Some(c) => Err(format!("NetworkReady false: {} {}", c.reason, c.message)),
                None => Err("no NetworkReady condition".into()),
            }
        }
    })
    .await?;
    step("Status", "NetworkReady with the bridge CNI network");

    let spec = |i: &str| cri::ImageSpec { image: i.into(), ..Default::default() };
    let pulled = img
        .pull_image(cri::PullImageRequest { image: Some(spec(image)), auth: None, sandbox_config: None })
        .await
        .map_err(e("PullImage"))?
        .into_inner();
    step("PullImage", format!("{image} -> {}", pulled.image_ref));

    let sc = sandbox_config();
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sc.clone()),
            runtime_handler: String::new(),
        })
        .await
        .map_err(e("RunPodSandbox"))?
        .into_inner()
        .pod_sandbox_id;
    // containerd pulled the sandbox image its config names (the client never asked for it).
    let sandbox_img = img
        .image_status(cri::ImageStatusRequest { image: Some(spec(sandbox_image)), verbose: false })
        .await
        .map_err(e("ImageStatus"))?
        .into_inner()
        .image
        .ok_or_else(|| format!("ImageStatus: the sandbox image {sandbox_image} is not there"))?;
    step("RunPodSandbox", format!("{pod} (sandbox image {sandbox_image}, {})", sandbox_img.id));

    let st = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: pod.clone(), verbose: false })
        .await
        .map_err(e("PodSandboxStatus"))?
        .into_inner()
        .status
        .ok_or("PodSandboxStatus: no status")?;
    if st.state != cri::PodSandboxState::SandboxReady as i32 {
        return Err(format!("PodSandboxStatus: state {} is not SANDBOX_READY", st.state));
    }
    let ip = st.network.map(|n| n.ip).unwrap_or_default();
    let addr: std::net::Ipv4Addr =
        ip.parse().map_err(|_| format!("PodSandboxStatus: pod IP {ip:?} is not IPv4"))?;
    if !addr.octets().starts_with(&[10, 88]) {
        return Err(format!("pod IP {ip} is not in the bridge's {SUBNET}"));
    }
    step("PodSandboxStatus", format!("ready, IP {ip}"));

    let cc = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: "web".into(), attempt: 0 }),
        image: Some(spec(image)),
        command: vec!["/bin/cri-client".into(), "serve".into(), PORT.to_string()],
        log_path: "web/0.log".into(),
        ..Default::default()
    };
    let ctr = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(cc),
            sandbox_config: Some(sc.clone()),
        })
        .await
        .map_err(e("CreateContainer"))?
        .into_inner()
        .container_id;
    step("CreateContainer", &ctr);
    rt.start_container(cri::StartContainerRequest { container_id: ctr.clone() })
        .await
        .map_err(e("StartContainer"))?;
    step("StartContainer", &ctr);

    let cs = rt
        .container_status(cri::ContainerStatusRequest { container_id: ctr.clone(), verbose: false })
        .await
        .map_err(e("ContainerStatus"))?
        .into_inner()
        .status
        .ok_or("ContainerStatus: no status")?;
    if cs.state != cri::ContainerState::ContainerRunning as i32 {
        return Err(format!(
            "ContainerStatus: state {} is not CONTAINER_RUNNING ({} {})",
            cs.state, cs.reason, cs.message
        ));
    }
    step("ContainerStatus", format!("running, log {}", cs.log_path));
    let cg = host_path(&format!("/sys/fs/cgroup/kubepods/besteffort/pod{POD_UID}"));
    let procs =
        std::fs::read_dir(&cg).map_err(|x| format!("the pod's cgroup {}: {x}", cg.display()))?.count();
    step("cgroup", format!("{} exists ({procs} entries)", cg.display()));

    let greeting = poll("the pod over the bridge", Duration::from_secs(60), || async move {
        let mut c = TcpStream::connect_timeout(&(addr, PORT).into(), Duration::from_secs(5))
            .map_err(|x| format!("connect {addr}:{PORT}: {x}"))?;
        c.set_read_timeout(Some(Duration::from_secs(5))).map_err(|x| x.to_string())?;
        let mut s = String::new();
        c.read_to_string(&mut s).map_err(|x| format!("read: {x}"))?;
        Ok(Some(s))
    })
    .await?;
    if greeting.trim() != format!("hello from pod {POD_NAME}") {
        return Err(format!("the pod answered {greeting:?}"));
    }
    step("reach", format!("{addr}:{PORT} answered {:?}", greeting.trim()));

    let log = host_path(&cs.log_path);
    let line = poll("the container's log line", Duration::from_secs(30), || {
        let log = log.clone();
        async move {
            let text = std::fs::read_to_string(&log).map_err(|x| format!("{}: {x}", log.display()))?;
            Ok(text.lines().find(|l| l.ends_with(&format!(" stdout F serving on {PORT}"))).map(String::from))
        }
    })
    .await?;
    // The CRI log format: RFC 3339 time, stream, P(artial)/F(ull), the text.
    let ts = line.split(' ').next().unwrap_or_default();
    if !(ts.len() >= 20 && ts.as_bytes()[4] == b'-' && ts.contains('T')) {
        return Err(format!("log line {line:?} does not start with an RFC 3339 time"));
    }
    step("log", format!("{}: {line:?}", cs.log_path));

    let ex = exec_sh(&mut rt, &ctr, "echo exec says hi; cat /etc/hostname; echo to-stderr >&2; exit 3")
        .await
        .map_err(e("ExecSync"))?;
    let (out, err) = (String::from_utf8_lossy(&ex.stdout), String::from_utf8_lossy(&ex.stderr));
    if out != format!("exec says hi\n{POD_NAME}\n") || err != "to-stderr\n" || ex.exit_code != 3 {
        return Err(format!("ExecSync: stdout {out:?} stderr {err:?} exit {}", ex.exit_code));
    }
    step("ExecSync", format!("stdout {out:?}, stderr {err:?}, exit 3"));

    // What the container's process spec gives its processes (containerd builds it from the
    // base spec, settings.oci-defaults): the capabilities and rlimits of the container's own
    // process (`main`) and of a process ExecSync starts in it (`exec`), one `cri: proc:` line
    // each, for the case to check against the settings.
    let limits = r#"for p in main:$(pidof cri-client) exec:self; do
                     { grep -E '^Cap(Bnd|Eff|Prm):' /proc/${p#*:}/status
                       grep -E '^Max (open files|core file size)' /proc/${p#*:}/limits; } | sed "s/^/${p%%:*} /"
                   done"#;
    let ex = exec_sh(&mut rt, &ctr, limits).await.map_err(e("ExecSync"))?;
    let out = String::from_utf8_lossy(&ex.stdout);
    if ex.exit_code != 0 || out.lines().count() != 10 {
        return Err(format!("ExecSync of the limits: stdout {out:?} exit {}", ex.exit_code));
    }
    for line in out.lines() {
        println!("cri: proc: {line}");
    }
    step("limits", "read by ExecSync");

    rt.stop_container(cri::StopContainerRequest { container_id: ctr.clone(), timeout: 5 })
        .await
        .map_err(e("StopContainer"))?;
    let cs = rt
        .container_status(cri::ContainerStatusRequest { container_id: ctr.clone(), verbose: false })
        .await
        .map_err(e("ContainerStatus"))?
        .into_inner()
        .status
        .ok_or("ContainerStatus: no status")?;
    if cs.state != cri::ContainerState::ContainerExited as i32 {
        return Err(format!("after StopContainer: state {} is not CONTAINER_EXITED", cs.state));
    }
    step("StopContainer", format!("exited, code {}", cs.exit_code));
    rt.remove_container(cri::RemoveContainerRequest { container_id: ctr.clone() })
        .await
        .map_err(e("RemoveContainer"))?;
    step("RemoveContainer", &ctr);
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: pod.clone() })
        .await
        .map_err(e("StopPodSandbox"))?;
    step("StopPodSandbox", &pod);
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod.clone() })
        .await
        .map_err(e("RemovePodSandbox"))?;
    step("RemovePodSandbox", &pod);

    let left = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .map_err(e("ListPodSandbox"))?
        .into_inner()
        .items;
    if left.iter().any(|p| p.id == pod) {
        return Err(format!("ListPodSandbox still lists {pod}"));
    }
    let lease = host_path(&format!("/var/lib/cni/networks/{CNI_NET}/{ip}"));
    if lease.exists() {
        return Err(format!("the pod's IP is still leased: {}", lease.display()));
    }
    step("ListPodSandbox", format!("{} pods left, IP {ip} released", left.len()));
    Ok(())
}
