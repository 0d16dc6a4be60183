//! Recognising the container engine this process runs under, and the options that
//! engine needs to give a container FUSE.

use std::fmt;

/// File that Docker creates in the root of every container.
const DOCKER_MARKER: &str = "/.dockerenv";
/// File that Podman creates in every container.
const PODMAN_MARKER: &str = "/run/.containerenv";
/// Variable that Kubernetes sets in every container of a pod.
const KUBERNETES_VARIABLE: &str = "KUBERNETES_SERVICE_HOST";

/// A container engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Docker,
    Podman,
    Kubernetes,
}

impl fmt::Display for Engine {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Engine::Docker => "Docker",
            Engine::Podman => "Podman",
            Engine::Kubernetes => "Kubernetes",
        })
    }
}

/// The container this process runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub engine: Engine,
    /// The file or variable that gave the engine away.
    pub evidence: &'static str,
    /// The AppArmor profile confining this process, when one does.
    pub apparmor_profile: Option<String>,
}

/// Detects the container engine, Kubernetes first because its pods may also carry the
/// marker file of the engine underneath.
pub fn detect() -> Option<Container> {
    let (engine, evidence) = if std::env::var_os(KUBERNETES_VARIABLE).is_some() {
        (Engine::Kubernetes, KUBERNETES_VARIABLE)
    } else if std::path::Path::new(PODMAN_MARKER).exists() {
        (Engine::Podman, PODMAN_MARKER)
    } else if std::path::Path::new(DOCKER_MARKER).exists() {
        (Engine::Docker, DOCKER_MARKER)
    } else {
        return None;
    };

    Some(Container {
        engine,
        evidence,
        apparmor_profile: apparmor_profile(),
    })
}

/// Returns the AppArmor profile of this process, or `None` when it is unconfined or AppArmor is
/// off. Newer kernels expose it under `attr/apparmor/`, older ones under `attr/` only.
fn apparmor_profile() -> Option<String> {
    [
        "/proc/self/attr/apparmor/current",
        "/proc/self/attr/current",
    ]
    .iter()
    .find_map(|path| std::fs::read_to_string(path).ok())
    .map(|profile| profile.trim_end_matches(['\n', '\0']).trim().to_string())
    .filter(|profile| !profile.is_empty() && profile != "unconfined")
}

impl Container {
    /// Returns the instruction that gives the container the FUSE device.
    pub fn device_fix(&self) -> String {
        match self.engine {
            Engine::Docker => "start the container with 'docker run --device /dev/fuse'".into(),
            Engine::Podman => "start the container with 'podman run --device /dev/fuse'".into(),
            Engine::Kubernetes => {
                "give the pod /dev/fuse through a device plugin, or set 'securityContext: {privileged: true}'".into()
            }
        }
    }

    /// Returns the instruction that lets root in the container mount, followed by the
    /// AppArmor note where a profile confines the container.
    pub fn mount_fix(&self) -> String {
        let capability = match self.engine {
            Engine::Docker => "start the container with 'docker run --cap-add SYS_ADMIN'",
            Engine::Podman => "start the container with 'podman run --cap-add SYS_ADMIN'",
            Engine::Kubernetes => {
                "add 'securityContext: {capabilities: {add: [SYS_ADMIN]}}' to the container"
            }
        };
        match self.apparmor_note() {
            Some(note) => format!("{capability}; {note}"),
            None => capability.to_string(),
        }
    }

    /// Returns the line `doctor` prints about the container: the engine, how it was
    /// found, and everything the container needs for FUSE.
    pub fn summary(&self) -> String {
        let options = match self.engine {
            Engine::Docker => {
                "it needs 'docker run --device /dev/fuse', plus '--cap-add SYS_ADMIN' to mount as root"
            }
            Engine::Podman => {
                "it needs 'podman run --device /dev/fuse', plus '--cap-add SYS_ADMIN' to mount as root"
            }
            Engine::Kubernetes => {
                "the pod needs /dev/fuse (a device plugin, or 'privileged: true'), plus the SYS_ADMIN capability to mount as root"
            }
        };
        let mut summary = format!("{} ({}); {options}", self.engine, self.evidence);
        if let Some(note) = self.apparmor_note() {
            summary.push_str("; ");
            summary.push_str(&note);
        }
        summary
    }

    /// Returns the line `doctor` prints about the container after a trial mount worked:
    /// the engine, without the list of what FUSE needs in it.
    pub fn summary_when_working(&self) -> String {
        format!("{}; FUSE mounts work in it", self.name())
    }

    /// Returns the engine and how it was found, for a line whose fix comes from another
    /// check (a `/dev/fuse` that exists but cannot be opened, for one).
    pub fn name(&self) -> String {
        format!("{} ({})", self.engine, self.evidence)
    }

    fn apparmor_note(&self) -> Option<String> {
        let profile = self.apparmor_profile.as_ref()?;
        let option = match self.engine {
            Engine::Docker | Engine::Podman => "'--security-opt apparmor=unconfined'",
            Engine::Kubernetes => "'appArmorProfile: {type: Unconfined}' in the securityContext",
        };
        Some(format!(
            "AppArmor profile '{profile}' confines it and may deny mount(2): add {option}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docker(apparmor_profile: Option<&str>) -> Container {
        Container {
            engine: Engine::Docker,
            evidence: DOCKER_MARKER,
            apparmor_profile: apparmor_profile.map(str::to_string),
        }
    }

    #[test]
    fn docker_summary_names_device_and_capability() {
        let summary = docker(None).summary();

        assert!(summary.starts_with("Docker (/.dockerenv)"), "{summary}");
        assert!(summary.contains("--device /dev/fuse"), "{summary}");
        assert!(summary.contains("--cap-add SYS_ADMIN"), "{summary}");
        assert!(!summary.contains("AppArmor"), "{summary}");
    }

    #[test]
    fn working_container_summary_omits_requirements() {
        let summary = docker(Some("docker-default (enforce)")).summary_when_working();

        assert_eq!(summary, "Docker (/.dockerenv); FUSE mounts work in it");
    }

    #[test]
    fn confined_container_gets_apparmor_note() {
        let container = docker(Some("docker-default (enforce)"));

        assert!(container.summary().contains("apparmor=unconfined"));
        assert!(container.mount_fix().contains("'docker-default (enforce)'"));
    }
}
