use super::*;

fn state(image: &str) -> AttachmentState {
    AttachmentState {
        name: String::new(),
        stage: Stage::Attached,
        image: PathBuf::from(image),
        offset: 0,
        size: 4096,
        sizelimit: 0,
        read_only: false,
        partscan: false,
        sector_size: 512,
        overlay: None,
        snapshot: false,
        pid: ProcessId::current(),
        partition_table: None,
        partition_problem: None,
        partitions: Vec::new(),
        scans: 0,
        cache: String::new(),
        mounts: Vec::new(),
        autoclear: false,
        pidfile: None,
        image_id: None,
    }
}

#[test]
fn reserve_takes_lowest_free_name() {
    let root = tempfile::tempdir().unwrap();
    let registry = Registry::at(root.path().join("loopfuse")).unwrap();

    let first = registry.reserve(state("/a.img")).unwrap();
    let second = registry.reserve(state("/b.img")).unwrap();
    assert_eq!(first.name(), "loop0");
    assert_eq!(second.name(), "loop1");

    first.keep();
    drop(second);
    let third = registry.reserve(state("/c.img")).unwrap();
    assert_eq!(third.name(), "loop1");
}

#[test]
fn dropped_reservation_leaves_nothing() {
    let root = tempfile::tempdir().unwrap();
    let registry = Registry::at(root.path().join("loopfuse")).unwrap();

    drop(registry.reserve(state("/a.img")).unwrap());

    assert_eq!(fs::read_dir(registry.root()).unwrap().count(), 0);
}

#[test]
fn find_accepts_name_device_and_image() {
    let root = tempfile::tempdir().unwrap();
    let registry = Registry::at(root.path().join("loopfuse")).unwrap();
    registry.reserve(state("/images/a.img")).unwrap().keep();
    let device = registry.mountpoint("loop0").join("disk");

    for query in ["loop0", device.to_str().unwrap(), "/images/a.img"] {
        assert_eq!(
            registry.find(query).unwrap().state.name,
            "loop0",
            "query {query}"
        );
    }
    assert!(matches!(
        registry.find("loop7"),
        Err(RegistryError::NotFound { .. })
    ));
}

#[test]
fn entry_of_dead_process_is_stale() {
    let root = tempfile::tempdir().unwrap();
    let registry = Registry::at(root.path().join("loopfuse")).unwrap();
    let mut dead = state("/a.img");
    dead.pid.start_time += 1;
    registry.reserve(dead).unwrap().keep();

    let entries = registry.list().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].liveness, Liveness::Stale);
}

#[test]
fn registry_rejects_shared_directory() {
    let root = tempfile::tempdir().unwrap();
    let shared = root.path().join("loopfuse");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();

    assert!(matches!(
        Registry::at(shared),
        Err(RegistryError::UnsafeRoot { .. })
    ));
}

#[test]
fn concurrent_updates_keep_both_changes() {
    let root = tempfile::tempdir().unwrap();
    let registry = Registry::at(root.path().join("loopfuse")).unwrap();
    registry.reserve(state("/a.img")).unwrap().keep();
    const ROUNDS: usize = 40;

    std::thread::scope(|scope| {
        scope.spawn(|| {
            for _ in 0..ROUNDS {
                registry
                    .update_state("loop0", |state| state.scans += 1)
                    .unwrap();
            }
        });
        scope.spawn(|| {
            for number in 0..ROUNDS {
                registry
                    .update_state("loop0", |state| {
                        state.mounts.push(MountRecord {
                            directory: PathBuf::from(format!("/mnt/{number}")),
                            device: PathBuf::from("/dev/null"),
                            partition: None,
                            fstype: "ext4".to_string(),
                            driver: "fuse2fs".to_string(),
                            driver_pid: None,
                            owns_attachment: true,
                            range: None,
                        })
                    })
                    .unwrap();
            }
        });
    });

    let state = registry.find("loop0").unwrap().state;
    assert_eq!(state.scans, ROUNDS as u64);
    assert_eq!(state.mounts.len(), ROUNDS);
}
