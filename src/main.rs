//! `berth`: the whole userspace of Berth in one binary. This file only dispatches:
//! PID 1 (pid 1, or argv[0] `init`), `apiclient` by argv[0], otherwise subcommands.

mod api;
mod apiclient;
mod boot;
mod bootctl;
mod disk;
mod ephemeral;
mod http;
mod image;
mod init;
mod klog;
mod net;
mod settings;
mod supervisor;
mod sys;
#[cfg(test)]
mod testing;
mod time;
mod update;
mod userdata;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

const USAGE: &str = "berth — a container-host OS in one binary

usage:
  berth version
  berth apiclient ...                      (also as argv[0] `apiclient`)
  berth serve --state-dir DIR --socket P   settings + API in dev mode (no PID 1 duties)
  berth bench-api SOCKET get|commit N SECS load generator for scripts/bench api
  berth bench-api SOCKET burst N SHAPE     N concurrent 1 MiB PATCH bodies (string|array|object)
  berth containerd-probe SOCKET            scripts/bench compare's probe: log when SOCKET answers
                                           containerd's version call, then the idle memory
  berth containerd-config                  the containerd configuration of default settings
  berth verity-format DATA HASH [SALT]     build a dm-verity hash tree; prints its parameters
  berth mkcpio MANIFEST OUT [NAME=VALUE..] build a newc cpio archive (initramfs)
  berth mkroot MANIFEST DIR [NAME=VALUE..] create a manifest's tree in DIR (root filesystem)
  berth bootctl show DISK                  A/B boot-control state of a disk image
  berth bootctl set DISK A|B PRIO TRIES OK set a slot's boot-control state
  berth bootctl autoboot DISK              the autoboot.txt for a disk's state (Raspberry Pi)
  berth host-container NAME SOURCE 0|1     run a host container (as a supervised service)
  berth exec-session TTY ROWS COLS NAME -- CMD...
                                           one `apiclient exec` session (started by the API)
  berth bootstrap                          run the bootstrap commands and containers (a service)
  berth selftest NAME                      run a PID 1 self-test (inside Berth)
  berth update-repo keygen|add|sign|set-max-version ...
                                           build and sign an update repository (host side)
As PID 1 (or argv[0] `init`) it boots the system.";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let argv0 = args.first().map(|a| a.rsplit('/').next().unwrap_or(a).to_string()).unwrap_or_default();
    // apiclient first: in a container it may be the first process (PID 1 of its namespace).
    if argv0 == "apiclient" {
        std::process::exit(apiclient::main(&args[1..]));
    }
    if sys::getpid() == 1 || argv0 == "init" {
        init::pid1();
    }
    if argv0 == "runc" {
        // /usr/libexec/berth/runc: the runc wrapper that labels containers.
        std::process::exit(supervisor::runc::main(&args[1..]));
    }
    klog::init(false);
    let rest = &args[args.len().min(2)..];
    let result = match args.get(1).map(String::as_str) {
        Some("version") | Some("--version") => {
            println!("berth {VERSION}");
            Ok(())
        }
        Some("apiclient") => std::process::exit(apiclient::main(rest)),
        Some("serve") => api::serve_dev(rest),
        Some("bench-api") => api::bench::run(rest),
        Some("containerd-probe") => supervisor::probe::probe_main(rest),
        Some("containerd-config") => {
            print!("{}", settings::render::render_file("containerd", &Default::default()));
            Ok(())
        }
        Some("host-container") => std::process::exit(supervisor::host_container::main(rest)),
        Some("verity-format") => image::verity_format(rest),
        Some("mkcpio") => image::mkcpio(rest),
        Some("mkroot") => image::mkroot(rest),
        Some("bootctl") => image::bootctl(rest),
        Some("update-repo") => update::repo::main(rest),
        Some("exec-session") => std::process::exit(api::exec::session_main(rest)),
        Some("bootstrap") => std::process::exit(init::bootstrap::main()),
        Some("selftest") => std::process::exit(init::selftest::run(rest.first().map_or("", |s| s))),
        Some("help") | Some("--help") | Some("-h") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command '{other}'\n\n{USAGE}")),
        None => Err(USAGE.to_string()),
    };
    if let Err(e) = result {
        eprintln!("berth: {e}");
        std::process::exit(1);
    }
}
