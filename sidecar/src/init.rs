//! `weft-sidecar init`: the iptables rules that make interception transparent.
//!
//! In the pod's network namespace (nat table): TCP arriving for the pod goes to the inbound
//! port (15006); TCP the pod sends goes to the outbound port (15001) — except traffic of the
//! proxy's own UID (so the proxy's upstream connections are not looped back), traffic to
//! loopback, and the excluded ports and CIDRs. Every rule lives in Weft's own chains
//! (`WEFT_INBOUND`, `WEFT_OUTPUT`) reached by one jump each from PREROUTING and OUTPUT, so
//! `--uninstall` removes exactly what `init` added and running `init` twice is harmless.
//! Both iptables back ends work: `iptables` (nf_tables on current Debian) is tried first,
//! then `iptables-legacy`; when neither can list the nat table, init refuses with both errors.
//!
//! IPv6 gets the same rules through `ip6tables` (or `ip6tables-legacy`), loopback being
//! `::1`, and the excluded CIDRs of each family going to their own table. When the pod has
//! IPv6 but no ip6tables can list its nat table, init refuses: it never leaves an IPv6 bypass
//! behind. A pod without IPv6 (disabled, or the kernel without it) gets IPv4 rules only.

use std::net::IpAddr;
use std::process::Command;

/// Chain for inbound redirection.
pub const INBOUND_CHAIN: &str = "WEFT_INBOUND";
/// Chain for outbound redirection.
pub const OUTPUT_CHAIN: &str = "WEFT_OUTPUT";

/// `weft-sidecar init` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct InitConfig {
    /// UID the proxy runs as; its own traffic is never intercepted.
    #[arg(long, env = "WEFT_PROXY_UID", default_value_t = 1337)]
    pub proxy_uid: u32,
    /// Port outbound traffic is redirected to.
    #[arg(long, env = "WEFT_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,
    /// Port inbound traffic is redirected to.
    #[arg(long, env = "WEFT_INBOUND_PORT", default_value_t = 15006)]
    pub inbound_port: u16,
    /// Inbound ports not intercepted (comma-separated), e.g. the proxy's admin port.
    #[arg(
        long,
        env = "WEFT_EXCLUDE_INBOUND_PORTS",
        value_delimiter = ',',
        default_value = "15000"
    )]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports not intercepted (comma-separated).
    #[arg(long, env = "WEFT_EXCLUDE_OUTBOUND_PORTS", value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination CIDRs not intercepted (comma-separated), e.g. `10.0.0.0/8`.
    #[arg(long, env = "WEFT_EXCLUDE_OUTBOUND_CIDRS", value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<String>,
    /// Redirect the pod's DNS (UDP and TCP port 53, the proxy's own queries excepted) to the
    /// sidecar's mesh DNS on this port (`weft-sidecar run --dns-addr 127.0.0.1:PORT`); off
    /// unless given.
    #[arg(long, env = "WEFT_REDIRECT_DNS_PORT")]
    pub redirect_dns_port: Option<u16>,
    /// Print the iptables commands instead of running them.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove Weft's rules and chains.
    #[arg(long)]
    pub uninstall: bool,
}

/// Why init could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A flag value is not usable.
    #[error("--exclude-outbound-cidrs: {0:?} is not a CIDR like 10.0.0.0/8 or fd00::/8")]
    Cidr(String),
    /// IPv6 is on in the pod but cannot be intercepted.
    #[error(
        "this pod has IPv6 but no usable ip6tables ({0}): refusing to leave IPv6 connections uninterceped; install ip6tables in the init image or disable IPv6 in the pod"
    )]
    NoIp6tables(String),
    /// No usable iptables.
    #[error("no usable iptables: {0}")]
    NoIptables(String),
    /// A rule failed.
    #[error("{binary} {args}: {message}")]
    Rule {
        /// The binary.
        binary: String,
        /// Its arguments.
        args: String,
        /// What it said.
        message: String,
    },
}

fn validate_cidr(c: &str) -> Result<(), InitError> {
    let (ip, len) = c.split_once('/').ok_or_else(|| InitError::Cidr(c.into()))?;
    let ip: IpAddr = ip.parse().map_err(|_| InitError::Cidr(c.into()))?;
    let len: u8 = len.parse().map_err(|_| InitError::Cidr(c.into()))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(InitError::Cidr(c.into()));
    }
    Ok(())
}

/// Which iptables family a rule set is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `iptables`.
    V4,
    /// `ip6tables`.
    V6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    fn holds(self, cidr: &str) -> bool {
        (self == Family::V6) == cidr.contains(':')
    }

    /// The binaries to try, in order.
    fn binaries(self) -> [&'static str; 2] {
        match self {
            Family::V4 => ["iptables", "iptables-legacy"],
            Family::V6 => ["ip6tables", "ip6tables-legacy"],
        }
    }
}

/// Whether this network namespace has IPv6 (an interface address, and not disabled).
pub fn ipv6_enabled() -> bool {
    let disabled = std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .map(|s| s.trim() == "1")
        .unwrap_or(true);
    let addresses = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
    !disabled && !addresses.trim().is_empty()
}

fn args(s: &[&str]) -> Vec<String> {
    s.iter().map(|x| x.to_string()).collect()
}

/// The commands that install the IPv4 rules (nat table), in order.
pub fn install_rules(cfg: &InitConfig) -> Result<Vec<Vec<String>>, InitError> {
    install_rules_for(cfg, Family::V4)
}

/// The commands that install one family's rules (nat table), in order.
pub fn install_rules_for(cfg: &InitConfig, family: Family) -> Result<Vec<Vec<String>>, InitError> {
    for c in &cfg.exclude_outbound_cidrs {
        validate_cidr(c)?;
    }
    let mut r = vec![
        args(&["-t", "nat", "-N", INBOUND_CHAIN]),
        args(&["-t", "nat", "-N", OUTPUT_CHAIN]),
    ];
    // Inbound: everything but excluded ports to the inbound listener.
    for p in &cfg.exclude_inbound_ports {
        r.push(args(&[
            "-t",
            "nat",
            "-A",
            INBOUND_CHAIN,
            "-p",
            "tcp",
            "--dport",
            &p.to_string(),
            "-j",
            "RETURN",
        ]));
    }
    r.push(args(&[
        "-t",
        "nat",
        "-A",
        INBOUND_CHAIN,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &cfg.inbound_port.to_string(),
    ]));
    // Outbound: the proxy's own traffic, loopback and exclusions pass; the rest to outbound.
    r.push(args(&[
        "-t",
        "nat",
        "-A",
        OUTPUT_CHAIN,
        "-m",
        "owner",
        "--uid-owner",
        &cfg.proxy_uid.to_string(),
        "-j",
        "RETURN",
    ]));
    // DNS before the loopback exemption: a pod whose resolver is on loopback is redirected too.
    // IPv4 only: the mesh DNS listens on 127.0.0.1 (pods' resolvers are IPv4 addresses).
    if let (Some(port), Family::V4) = (cfg.redirect_dns_port, family) {
        for proto in ["udp", "tcp"] {
            r.push(args(&[
                "-t",
                "nat",
                "-A",
                OUTPUT_CHAIN,
                "-p",
                proto,
                "--dport",
                "53",
                "-j",
                "REDIRECT",
                "--to-ports",
                &port.to_string(),
            ]));
        }
    }
    r.push(args(&[
        "-t",
        "nat",
        "-A",
        OUTPUT_CHAIN,
        "-o",
        "lo",
        "-j",
        "RETURN",
    ]));
    r.push(args(&[
        "-t",
        "nat",
        "-A",
        OUTPUT_CHAIN,
        "-d",
        family.loopback(),
        "-j",
        "RETURN",
    ]));
    for c in cfg
        .exclude_outbound_cidrs
        .iter()
        .filter(|c| family.holds(c))
    {
        r.push(args(&[
            "-t",
            "nat",
            "-A",
            OUTPUT_CHAIN,
            "-d",
            c,
            "-j",
            "RETURN",
        ]));
    }
    for p in &cfg.exclude_outbound_ports {
        r.push(args(&[
            "-t",
            "nat",
            "-A",
            OUTPUT_CHAIN,
            "-p",
            "tcp",
            "--dport",
            &p.to_string(),
            "-j",
            "RETURN",
        ]));
    }
    r.push(args(&[
        "-t",
        "nat",
        "-A",
        OUTPUT_CHAIN,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &cfg.outbound_port.to_string(),
    ]));
    // The jumps last, so traffic is only diverted once the chains are complete.
    r.push(inbound_jump("-A"));
    r.push(args(&[
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-j",
        OUTPUT_CHAIN,
    ]));
    if cfg.redirect_dns_port.is_some() && family == Family::V4 {
        r.push(dns_jump("-A"));
    }
    Ok(r)
}

/// The PREROUTING jump to the inbound chain (`op`: `-A` or `-D`). Only connections addressed to
/// this pod: a neighbour that routes a packet for some other destination through the pod must
/// not have the proxy dial it from here.
fn inbound_jump(op: &str) -> Vec<String> {
    args(&[
        "-t",
        "nat",
        op,
        "PREROUTING",
        "-p",
        "tcp",
        "-m",
        "addrtype",
        "--dst-type",
        "LOCAL",
        "-j",
        INBOUND_CHAIN,
    ])
}

/// The OUTPUT jump that sends UDP DNS through the outbound chain (TCP already goes there).
fn dns_jump(op: &str) -> Vec<String> {
    args(&[
        "-t",
        "nat",
        op,
        "OUTPUT",
        "-p",
        "udp",
        "--dport",
        "53",
        "-j",
        OUTPUT_CHAIN,
    ])
}

/// The commands that remove the rules; each may fail harmlessly when already absent.
pub fn uninstall_rules() -> Vec<Vec<String>> {
    vec![
        inbound_jump("-D"),
        // The jump as versions before the LOCAL match wrote it.
        args(&[
            "-t",
            "nat",
            "-D",
            "PREROUTING",
            "-p",
            "tcp",
            "-j",
            INBOUND_CHAIN,
        ]),
        args(&["-t", "nat", "-D", "OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN]),
        dns_jump("-D"),
        args(&["-t", "nat", "-F", INBOUND_CHAIN]),
        args(&["-t", "nat", "-X", INBOUND_CHAIN]),
        args(&["-t", "nat", "-F", OUTPUT_CHAIN]),
        args(&["-t", "nat", "-X", OUTPUT_CHAIN]),
    ]
}

/// The first iptables binary that can list the nat table.
pub fn detect_iptables() -> Result<String, InitError> {
    detect(Family::V4).map_err(InitError::NoIptables)
}

/// The first binary of `family` that can list the nat table, or every error.
fn detect(family: Family) -> Result<String, String> {
    let mut errors = Vec::new();
    for bin in family.binaries() {
        match Command::new(bin).args(["-t", "nat", "-S"]).output() {
            Ok(o) if o.status.success() => return Ok(bin.to_string()),
            Ok(o) => errors.push(format!(
                "{bin}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => errors.push(format!("{bin}: {e}")),
        }
    }
    Err(errors.join("; "))
}

fn run(binary: &str, a: &[String]) -> Result<(), InitError> {
    let o = Command::new(binary)
        .args(a)
        .output()
        .map_err(|e| InitError::Rule {
            binary: binary.into(),
            args: a.join(" "),
            message: e.to_string(),
        })?;
    if o.status.success() {
        Ok(())
    } else {
        Err(InitError::Rule {
            binary: binary.into(),
            args: a.join(" "),
            message: String::from_utf8_lossy(&o.stderr).trim().to_string(),
        })
    }
}

/// Runs init: prints, installs (replacing any earlier Weft rules) or uninstalls.
pub fn run_init(cfg: &InitConfig) -> Result<(), InitError> {
    let v6 = ipv6_enabled();
    let mut families = vec![Family::V4];
    if v6 || cfg.dry_run {
        families.push(Family::V6);
    }
    // Check both families can be set up before changing anything.
    let mut plans = Vec::new();
    for family in families {
        let install = if cfg.uninstall {
            Vec::new()
        } else {
            install_rules_for(cfg, family)?
        };
        if cfg.dry_run {
            let bin = family.binaries()[0];
            for a in uninstall_rules().iter().chain(&install) {
                println!("{bin} {}", a.join(" "));
            }
            continue;
        }
        let bin = match (family, detect(family)) {
            (_, Ok(b)) => b,
            (Family::V4, Err(e)) => return Err(InitError::NoIptables(e)),
            (Family::V6, Err(e)) => return Err(InitError::NoIp6tables(e)),
        };
        plans.push((bin, install));
    }
    for (bin, install) in &plans {
        // Idempotent: remove what an earlier init left, ignoring "does not exist".
        for a in uninstall_rules() {
            let _ = run(bin, &a);
        }
        for a in install {
            run(bin, a)?;
        }
    }
    if !cfg.dry_run {
        let bins: Vec<&str> = plans.iter().map(|(b, _)| b.as_str()).collect();
        eprintln!(
            "weft-sidecar init: {} with {}{}",
            if cfg.uninstall {
                "rules removed"
            } else {
                "rules installed"
            },
            bins.join(" and "),
            if v6 { "" } else { " (no IPv6 in this pod)" }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> InitConfig {
        InitConfig {
            proxy_uid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            exclude_inbound_ports: vec![15000, 22],
            exclude_outbound_ports: vec![5432],
            exclude_outbound_cidrs: vec!["10.96.0.0/12".into()],
            redirect_dns_port: None,
            dry_run: true,
            uninstall: false,
        }
    }

    /// `cfg`'s IPv4 rules as command lines.
    fn lines(cfg: &InitConfig) -> Vec<String> {
        install_rules(cfg)
            .expect("valid")
            .iter()
            .map(|r| r.join(" "))
            .collect()
    }

    /// The index of the first of `rules` containing `needle`.
    fn pos(rules: &[String], needle: &str) -> usize {
        rules
            .iter()
            .position(|r| r.contains(needle))
            .unwrap_or_else(|| panic!("{needle} missing from {rules:#?}"))
    }

    #[test]
    fn dns_is_redirected_only_when_asked_and_never_the_proxys_own() {
        let plain = lines(&cfg());
        assert!(
            !plain.iter().any(|r| r.contains("--dport 53")),
            "{plain:#?}"
        );
        let rules = lines(&InitConfig {
            redirect_dns_port: Some(15053),
            ..cfg()
        });
        let pos = |needle: &str| pos(&rules, needle);
        let own = pos("--uid-owner 1337 -j RETURN");
        for proto in ["udp", "tcp"] {
            let r = pos(&format!(
                "WEFT_OUTPUT -p {proto} --dport 53 -j REDIRECT --to-ports 15053"
            ));
            assert!(own < r, "the proxy's own queries must pass first");
            assert!(
                r < pos("-o lo -j RETURN"),
                "a loopback resolver is redirected too"
            );
        }
        // UDP reaches the chain through its own jump, added with the others at the end.
        assert_eq!(
            rules.last().map(String::as_str),
            Some("-t nat -A OUTPUT -p udp --dport 53 -j WEFT_OUTPUT")
        );
        assert!(
            uninstall_rules()
                .iter()
                .any(|r| r.join(" ") == "-t nat -D OUTPUT -p udp --dport 53 -j WEFT_OUTPUT")
        );
    }

    #[test]
    fn rules_skip_proxy_loopback_and_exclusions_before_redirecting() {
        let rules = lines(&cfg());
        let pos = |needle: &str| pos(&rules, needle);
        let redirect_out = pos("WEFT_OUTPUT -p tcp -j REDIRECT --to-ports 15001");
        for skip in [
            "--uid-owner 1337 -j RETURN",
            "-o lo -j RETURN",
            "-d 127.0.0.0/8 -j RETURN",
            "-d 10.96.0.0/12 -j RETURN",
            "--dport 5432 -j RETURN",
        ] {
            assert!(
                pos(skip) < redirect_out,
                "{skip} must come before the redirect"
            );
        }
        let redirect_in = pos("WEFT_INBOUND -p tcp -j REDIRECT --to-ports 15006");
        assert!(pos("WEFT_INBOUND -p tcp --dport 15000 -j RETURN") < redirect_in);
        assert!(pos("WEFT_INBOUND -p tcp --dport 22 -j RETURN") < redirect_in);
        // The jumps come last.
        assert_eq!(pos("-A PREROUTING"), rules.len() - 2);
        assert!(rules[rules.len() - 2].contains("-m addrtype --dst-type LOCAL"));
        assert_eq!(pos("-A OUTPUT -p tcp -j WEFT_OUTPUT"), rules.len() - 1);
    }

    #[test]
    fn bad_cidrs_are_refused() {
        for bad in ["10.0.0.0", "10.0.0.0/33", "ten/8", "fd00::/129"] {
            let mut c = cfg();
            c.exclude_outbound_cidrs = vec![bad.into()];
            let e = install_rules(&c).expect_err(bad).to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn ipv6_rules_mirror_ipv4_with_their_own_loopback_and_cidrs() {
        let mut c = cfg();
        c.exclude_outbound_cidrs = vec!["10.96.0.0/12".into(), "fd00:10:96::/112".into()];
        let v6: Vec<String> = install_rules_for(&c, Family::V6)
            .expect("valid")
            .iter()
            .map(|r| r.join(" "))
            .collect();
        let v4: Vec<String> = install_rules_for(&c, Family::V4)
            .expect("valid")
            .iter()
            .map(|r| r.join(" "))
            .collect();
        assert!(
            v6.iter().any(|r| r.contains("-d ::1/128 -j RETURN")),
            "{v6:#?}"
        );
        assert!(
            v6.iter()
                .any(|r| r.contains("-d fd00:10:96::/112 -j RETURN"))
        );
        assert!(!v6.iter().any(|r| r.contains("10.96.0.0/12")));
        assert!(!v4.iter().any(|r| r.contains("fd00")));
        assert!(v6.iter().any(|r| r.contains("REDIRECT --to-ports 15001")));
        assert!(v6.iter().any(|r| r.contains("REDIRECT --to-ports 15006")));
    }

    #[test]
    fn uninstall_removes_jumps_before_chains() {
        let u: Vec<String> = uninstall_rules().iter().map(|r| r.join(" ")).collect();
        assert!(u[0].contains("-D PREROUTING") && u[1].contains("-D PREROUTING"));
        assert!(u[2].contains("-D OUTPUT"));
        assert!(u.iter().any(|r| r.contains("-X WEFT_INBOUND")));
        assert!(u.iter().any(|r| r.contains("-X WEFT_OUTPUT")));
    }
}
