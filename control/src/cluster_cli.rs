//! `freeflow cluster up|down|ls`: the simulated cluster of freeflow-testbed from the command line,
//! for the demo and for trying Freeflow by hand on one machine.

use clap::{Args, Subcommand};
use freeflow_testbed::{self as topology, Cluster, ClusterSpec, TopologyError};
use std::net::Ipv4Addr;

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Build hosts (network namespaces joined by a link, VXLAN overlay) and containers; they stay
    /// until `cluster down`
    Up(UpArgs),
    /// Remove every namespace and interface of a cluster
    Down(DownArgs),
    /// List the clusters present on this machine
    Ls,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Short unique name: 1 to 8 of a-z 0-9
    #[arg(long)]
    tag: String,
    /// Number of hosts (host i has link address 192.168.1.(i+1))
    #[arg(long, default_value_t = 2)]
    hosts: usize,
    /// A container as NAME:HOST:IP, e.g. web:0:10.32.0.2 (prefix /12); repeat for more
    #[arg(long = "container", value_name = "NAME:HOST:IP")]
    containers: Vec<String>,
}

#[derive(Args, Debug)]
pub struct DownArgs {
    /// The cluster's tag
    #[arg(long)]
    tag: String,
}

fn parse_container(spec: &str) -> Result<(String, usize, Ipv4Addr), String> {
    let mut parts = spec.split(':');
    let (Some(name), Some(host), Some(ip), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("--container {spec:?}: expected NAME:HOST:IP"));
    };
    let host = host
        .parse()
        .map_err(|_| format!("--container {spec:?}: host must be a number"))?;
    let ip = ip
        .parse()
        .map_err(|_| format!("--container {spec:?}: bad IPv4 address"))?;
    Ok((name.to_string(), host, ip))
}

/// Runs a cluster subcommand; prints what it made as JSON (up) or a count (down).
pub fn run(cmd: ClusterCmd) -> Result<(), String> {
    let err = |e: TopologyError| e.to_string();
    match cmd {
        ClusterCmd::Up(args) => {
            let containers = args
                .containers
                .iter()
                .map(|c| parse_container(c))
                .collect::<Result<Vec<_>, _>>()?;
            let mut cluster =
                Cluster::create(ClusterSpec::new(&args.tag, args.hosts)).map_err(err)?;
            for (name, host, ip) in containers {
                // On error the cluster is dropped, which removes everything made so far.
                cluster.add_container(host, &name, ip, 12).map_err(err)?;
            }
            let described = cluster.describe();
            let _persistent = cluster.persist();
            println!(
                "{}",
                serde_json::to_string_pretty(&described).map_err(|e| e.to_string())?
            );
            Ok(())
        }
        ClusterCmd::Down(args) => {
            let removed = topology::teardown_tag(&args.tag).map_err(err)?;
            println!("removed {removed} namespace(s) of cluster {}", args.tag);
            Ok(())
        }
        ClusterCmd::Ls => {
            for tag in topology::list_tags().map_err(err)? {
                println!("{tag}");
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_container;

    #[test]
    fn container_specs() {
        assert_eq!(
            parse_container("web:1:10.32.0.2").unwrap(),
            ("web".into(), 1, "10.32.0.2".parse().unwrap())
        );
        assert!(parse_container("web:1").is_err());
        assert!(parse_container("web:x:10.32.0.2").is_err());
        assert!(parse_container("web:1:10.32.0").is_err());
        assert!(parse_container("web:1:10.32.0.2:9").is_err());
    }
}
