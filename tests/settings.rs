//! Settings: file + environment layering, defaults, validation messages, password redaction.

use std::{path::PathBuf, time::Duration};

use pgherd::{settings::Role, Settings, SettingsError};
use secrecy::ExposeSecret;

const SECRET: &str = "hunter2-very-secret";

const VALID: &str = r#"
[pool]
max_size = 8
wait_timeout = "500ms"

[endpoints.primary]
role = "primary"
host = "127.0.0.1"
port = 5432
dbname = "app"
user = "app"
password = "hunter2-very-secret"

[endpoints.standby_1]
role = "standby"
host = "127.0.0.1"
port = 5433
dbname = "app"
user = "app"
password = "hunter2-very-secret"
pool = { max_size = 4 }
"#;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temporary directory"),
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write fixture file");
        path
    }

    fn load(&self, text: &str) -> Result<Settings, SettingsError> {
        self.load_env(text, &[])
    }

    fn load_env(&self, text: &str, env: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let path = self.write("Settings.toml", text);
        Settings::load_with_env(&path, env.iter().copied())
    }
}

/// Loads `text`, expects an error about `key`, checks that the message names the key and never
/// the password, and returns the message of the problem.
fn expect_problem(text: &str, env: &[(&str, &str)], key: &str) -> String {
    let fixture = Fixture::new();
    let error = fixture
        .load_env(text, env)
        .expect_err("these settings must be refused");
    let rendered = error.to_string();
    assert!(
        !rendered.contains(SECRET),
        "the error shows the password: {rendered}"
    );
    assert!(
        !format!("{error:?}").contains(SECRET),
        "the error's Debug shows the password"
    );
    assert!(
        rendered.contains(&format!("`{key}`")),
        "the error does not name `{key}`: {rendered}"
    );
    let problem = error
        .problems()
        .iter()
        .find(|p| p.key() == key)
        .unwrap_or_else(|| panic!("no problem about `{key}` in: {rendered}"));
    problem.message().to_owned()
}

fn replace(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "fixture does not contain {from:?}");
    text.replacen(from, to, 1)
}

#[test]
fn valid_settings_load_with_defaults_and_overrides() {
    let settings = Fixture::new().load(VALID).expect("valid settings");
    assert_eq!(settings.endpoints.len(), 2);
    let (name, primary) = settings.primary().expect("a primary");
    assert_eq!(name, "primary");
    assert_eq!(primary.role, Role::Primary);
    assert_eq!(primary.address(), "127.0.0.1:5432");
    let standby_pool = settings.pool_for("standby_1");
    assert_eq!(standby_pool.max_size, 4, "the endpoint override applies");
    assert_eq!(standby_pool.wait_timeout, Duration::from_millis(500));
    assert_eq!(
        standby_pool.connect_timeout,
        pgherd::settings::DEFAULT_CONNECT_TIMEOUT,
        "unset keys keep their documented default"
    );
    assert_eq!(settings.pool_for("primary").max_size, 8);
}

#[test]
fn environment_overrides_a_port() {
    let settings = Fixture::new()
        .load_env(VALID, &[("PGHERD_ENDPOINTS__PRIMARY__PORT", "6543")])
        .expect("valid settings");
    assert_eq!(settings.endpoint("primary").map(|e| e.port), Some(6543));
}

#[test]
fn environment_overrides_a_duration_and_can_add_an_endpoint_key() {
    let settings = Fixture::new()
        .load_env(
            VALID,
            &[
                ("PGHERD_POOL__WAIT_TIMEOUT", "3s"),
                ("PGHERD_ENDPOINTS__STANDBY_1__POOL__MAX_SIZE", "2"),
                ("UNRELATED_VARIABLE", "ignored"),
            ],
        )
        .expect("valid settings");
    assert_eq!(settings.pool.wait_timeout, Duration::from_secs(3));
    assert_eq!(settings.pool_for("standby_1").max_size, 2);
}

#[test]
fn process_environment_is_read_by_load() {
    // A variable name no other test uses, so this test cannot disturb the others.
    let fixture = Fixture::new();
    let path = fixture.write("Settings.toml", VALID);
    std::env::set_var("PGHERD_ENDPOINTS__PRIMARY__DBNAME", "from_env");
    let loaded = Settings::load(&path);
    std::env::remove_var("PGHERD_ENDPOINTS__PRIMARY__DBNAME");
    let settings = loaded.expect("valid settings");
    assert_eq!(
        settings.endpoint("primary").map(|e| e.dbname.as_str()),
        Some("from_env")
    );
}

#[test]
fn password_file_is_read_relative_to_the_settings_file() {
    let fixture = Fixture::new();
    fixture.write("primary.password", &format!("{SECRET}\n"));
    let text = VALID
        .replacen(
            &format!("password = \"{SECRET}\""),
            "password_file = \"primary.password\"",
            1,
        )
        .to_string();
    let settings = fixture.load(&text).expect("valid settings");
    let primary = settings.endpoint("primary").expect("primary");
    let password = primary
        .resolve_password("endpoints.primary")
        .expect("readable")
        .expect("a password");
    assert_eq!(password.expose_secret(), SECRET, "the newline is stripped");
}

#[test]
fn debug_output_never_contains_a_password() {
    let settings = Fixture::new().load(VALID).expect("valid settings");
    let debug = format!("{settings:?}");
    assert!(!debug.contains(SECRET), "{debug}");
    assert!(debug.contains("<redacted>"));
}

#[test]
fn the_reference_settings_file_is_valid() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Settings.toml");
    let no_overrides: [(&str, &str); 0] = [];
    let settings = Settings::load_with_env(&path, no_overrides)
        .unwrap_or_else(|error| panic!("Settings.toml is refused: {error}"));
    assert_eq!(settings.primary().map(|(name, _)| name), Some("primary"));
    assert_eq!(settings.endpoints_with_role(Role::Standby).count(), 2);
}

// ----- Bad settings: each is refused with a message that names the key. -----

#[test]
fn typo_in_a_key() {
    let text = replace(VALID, "port = 5432", "prot = 5432");
    let message = expect_problem(&text, &[], "endpoints.primary.prot");
    assert!(message.contains("unknown key"), "{message}");
    assert!(
        message.contains("`port`"),
        "lists the accepted keys: {message}"
    );
}

#[test]
fn typo_in_a_section_name() {
    let text = format!("{VALID}\n[pol]\nmax_size = 3\n");
    expect_problem(&text, &[], "pol");
}

#[test]
fn two_primaries() {
    let text = replace(VALID, "role = \"standby\"", "role = \"primary\"");
    let message = expect_problem(&text, &[], "endpoints.standby_1.role");
    assert!(message.contains("`primary`"), "names the other: {message}");
}

#[test]
fn no_primary() {
    let text = replace(VALID, "role = \"primary\"", "role = \"backup\"");
    let message = expect_problem(&text, &[], "endpoints");
    assert!(message.contains("primary"), "{message}");
}

#[test]
fn no_endpoints() {
    expect_problem("[pool]\nmax_size = 4\n", &[], "endpoints");
}

#[test]
fn duration_without_unit() {
    let text = replace(VALID, "wait_timeout = \"500ms\"", "wait_timeout = \"30\"");
    let message = expect_problem(&text, &[], "pool.wait_timeout");
    assert!(message.contains("no unit"), "{message}");
    assert!(
        message.contains("\"30s\""),
        "shows how to write it: {message}"
    );
}

#[test]
fn duration_as_a_bare_number() {
    let text = replace(VALID, "wait_timeout = \"500ms\"", "wait_timeout = 30");
    expect_problem(&text, &[], "pool.wait_timeout");
}

#[test]
fn duration_that_is_not_a_duration() {
    let text = replace(VALID, "wait_timeout = \"500ms\"", "wait_timeout = \"soon\"");
    let message = expect_problem(&text, &[], "pool.wait_timeout");
    assert!(message.contains("soon"), "{message}");
}

#[test]
fn zero_timeout_in_an_endpoint_override() {
    let text = replace(
        VALID,
        "pool = { max_size = 4 }",
        "pool = { max_size = 4, connect_timeout = \"0s\" }",
    );
    expect_problem(&text, &[], "endpoints.standby_1.pool.connect_timeout");
}

#[test]
fn port_zero() {
    let text = replace(VALID, "port = 5432", "port = 0");
    let message = expect_problem(&text, &[], "endpoints.primary.port");
    assert!(message.contains("1 to 65535"), "{message}");
}

#[test]
fn port_too_large() {
    let text = replace(VALID, "port = 5432", "port = 70000");
    let message = expect_problem(&text, &[], "endpoints.primary.port");
    assert!(message.contains("70000"), "{message}");
    assert!(message.contains("1 to 65535"), "{message}");
}

#[test]
fn port_from_the_environment_that_is_not_a_number() {
    let message = expect_problem(
        VALID,
        &[("PGHERD_ENDPOINTS__PRIMARY__PORT", "fivefourthreetwo")],
        "endpoints.primary.port",
    );
    assert!(message.contains("environment"), "{message}");
}

#[test]
fn empty_host() {
    let text = replace(VALID, "host = \"127.0.0.1\"", "host = \"\"");
    expect_problem(&text, &[], "endpoints.primary.host");
}

#[test]
fn host_given_as_a_url() {
    let text = replace(
        VALID,
        "host = \"127.0.0.1\"",
        "host = \"postgres://db.example.com\"",
    );
    let message = expect_problem(&text, &[], "endpoints.primary.host");
    assert!(message.contains("URL"), "{message}");
}

#[test]
fn missing_required_key() {
    let text = replace(VALID, "dbname = \"app\"\n", "");
    let message = expect_problem(&text, &[], "endpoints.primary.dbname");
    assert!(message.contains("required"), "{message}");
}

#[test]
fn unknown_role() {
    let text = replace(VALID, "role = \"standby\"", "role = \"secondary\"");
    let message = expect_problem(&text, &[], "endpoints.standby_1.role");
    assert!(message.contains("secondary"), "{message}");
    assert!(message.contains("\"standby\""), "{message}");
}

#[test]
fn missing_password_file() {
    let text = replace(
        VALID,
        &format!("password = \"{SECRET}\""),
        "password_file = \"/nonexistent/pgherd/password\"",
    );
    let message = expect_problem(&text, &[], "endpoints.primary.password_file");
    assert!(
        message.contains("/nonexistent/pgherd/password"),
        "{message}"
    );
}

#[test]
fn empty_password_file() {
    let fixture = Fixture::new();
    fixture.write("empty.password", "\n");
    let text = replace(
        VALID,
        &format!("password = \"{SECRET}\""),
        "password_file = \"empty.password\"",
    );
    let error = fixture.load(&text).expect_err("refused");
    assert!(error.mentions("endpoints.primary.password_file"), "{error}");
}

#[test]
fn password_env_not_set() {
    let text = replace(
        VALID,
        &format!("password = \"{SECRET}\""),
        "password_env = \"PGHERD_TEST_SURELY_UNSET_VARIABLE_1\"",
    );
    // Also refused for its PGHERD_ prefix; both problems name the key.
    let message = expect_problem(&text, &[], "endpoints.primary.password_env");
    assert!(message.contains("PGHERD_TEST_SURELY_UNSET_VARIABLE_1"));
}

#[test]
fn password_env_with_the_settings_prefix() {
    let fixture = Fixture::new();
    let text = replace(
        VALID,
        &format!("password = \"{SECRET}\""),
        "password_env = \"PGHERD_PRIMARY_PASSWORD\"",
    );
    let error = fixture.load(&text).expect_err("refused");
    let problem = error
        .problems()
        .iter()
        .find(|p| p.key() == "endpoints.primary.password_env" && p.message().contains("PGHERD_*"))
        .unwrap_or_else(|| panic!("no prefix problem: {error}"));
    assert!(problem.message().contains("APP_PRIMARY_PASSWORD"));
}

#[test]
fn uppercase_endpoint_name() {
    let text = replace(VALID, "[endpoints.primary]", "[endpoints.Primary]");
    let message = expect_problem(&text, &[], "endpoints.Primary");
    assert!(message.contains("lowercase"), "{message}");
    assert!(message.contains("`primary`"), "suggests a name: {message}");
}

#[test]
fn pool_size_zero() {
    let text = replace(VALID, "max_size = 8", "max_size = 0");
    let message = expect_problem(&text, &[], "pool.max_size");
    assert!(message.contains("1 to"), "{message}");
}

#[test]
fn negative_pool_size() {
    let text = replace(VALID, "max_size = 8", "max_size = -3");
    expect_problem(&text, &[], "pool.max_size");
}

#[test]
fn password_given_twice() {
    let text = replace(
        VALID,
        &format!("password = \"{SECRET}\""),
        &format!("password = \"{SECRET}\"\npassword_file = \"/etc/hostname\""),
    );
    let message = expect_problem(&text, &[], "endpoints.primary.password");
    assert!(message.contains("more than once"), "{message}");
}

#[test]
fn password_of_the_wrong_type_is_not_quoted() {
    let text = replace(
        VALID,
        &format!("password = \"{SECRET}\""),
        "password = { value = \"987654321\" }",
    );
    let fixture = Fixture::new();
    let error = fixture.load(&text).expect_err("refused");
    assert!(error.mentions("endpoints.primary.password"), "{error}");
    assert!(!error.to_string().contains("987654321"), "{error}");
}

#[test]
fn broken_toml_does_not_quote_the_broken_line() {
    // An unterminated string on the password line: the parser's excerpt would show the secret.
    let text = replace(
        VALID,
        &format!("password = \"{SECRET}\""),
        &format!("password = \"{SECRET}"),
    );
    let message = expect_problem(&text, &[], "file");
    assert!(message.contains("line"), "gives the position: {message}");
}

#[test]
fn duplicate_endpoint() {
    let text = replace(VALID, "port = 5433", "port = 5432");
    let message = expect_problem(&text, &[], "endpoints.standby_1");
    assert!(message.contains("`primary`"), "{message}");
}

#[test]
fn stray_environment_variable() {
    let message = expect_problem(VALID, &[("PGHERD_LOG", "debug")], "log");
    assert!(message.contains("PGHERD_LOG"), "{message}");
}

#[test]
fn missing_file() {
    let error = Settings::load("/nonexistent/pgherd/Settings.toml").expect_err("refused");
    assert!(error.mentions("file"), "{error}");
    assert!(error.to_string().contains("does not exist"), "{error}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = replace(VALID, "port = 5432", "port = 0");
    let text = replace(&text, "host = \"127.0.0.1\"", "host = \"\"");
    let error = Fixture::new().load(&text).expect_err("refused");
    assert!(error.mentions("endpoints.primary.port"), "{error}");
    assert!(error.mentions("endpoints.primary.host"), "{error}");
}

// ----- Keys of the router, the supervisor, clusters and TLS. -----

#[test]
fn router_supervisor_and_tls_keys_load() {
    let text = format!(
        "{VALID}\n[router]\nread_policy = \"weighted\"\nqueue_capacity = 64\ndefault_timeout = \"750ms\"\n\
         [supervisor]\nmax_restarts = 3\nbackoff_initial = \"50ms\"\n"
    );
    let text = replace(
        &text,
        "port = 5433",
        "port = 5433\nweight = 3\nsslmode = \"require\"",
    );
    let settings = Fixture::new().load(&text).expect("valid settings");
    assert_eq!(
        settings.router.read_policy,
        pgherd::settings::ReadPolicy::Weighted
    );
    assert_eq!(settings.router.queue_capacity, 64);
    assert_eq!(settings.router.default_timeout, Duration::from_millis(750));
    assert!(
        settings.router.fallback_to_primary,
        "unset keys keep their default"
    );
    assert_eq!(settings.supervisor.max_restarts, 3);
    let standby = settings.endpoint("standby_1").expect("standby");
    assert_eq!(standby.weight, 3);
    assert_eq!(standby.sslmode, pgherd::settings::SslMode::Require);
    assert_eq!(standby.cluster, "main");
}

#[test]
fn a_primary_per_cluster_is_fine() {
    let text = format!(
        "{VALID}\n[endpoints.tenant]\nrole = \"primary\"\ncluster = \"tenant_b\"\nhost = \"10.0.0.9\"\n\
         dbname = \"b\"\nuser = \"b\"\n"
    );
    let settings = Fixture::new()
        .load(&text)
        .expect("two clusters, a primary each");
    assert_eq!(settings.clusters().len(), 2);
}

#[test]
fn two_primaries_in_one_of_several_clusters() {
    let text = format!(
        "{VALID}\n[endpoints.tenant]\nrole = \"primary\"\ncluster = \"tenant_b\"\nhost = \"10.0.0.9\"\n\
         dbname = \"b\"\nuser = \"b\"\n[endpoints.tenant_2]\nrole = \"primary\"\ncluster = \"tenant_b\"\n\
         host = \"10.0.0.8\"\ndbname = \"b\"\nuser = \"b\"\n"
    );
    let message = expect_problem(&text, &[], "endpoints.tenant_2.role");
    assert!(message.contains("cluster `tenant_b`"), "{message}");
}

#[test]
fn unknown_sslmode() {
    let text = replace(
        VALID,
        "port = 5433",
        "port = 5433\nsslmode = \"verify_full\"",
    );
    let message = expect_problem(&text, &[], "endpoints.standby_1.sslmode");
    assert!(message.contains("\"verify-full\""), "{message}");
}

#[test]
fn sslrootcert_without_verification() {
    let text = replace(
        VALID,
        "port = 5433",
        "port = 5433\nsslrootcert = \"/etc/hostname\"",
    );
    let message = expect_problem(&text, &[], "endpoints.standby_1.sslrootcert");
    assert!(message.contains("verify-full"), "{message}");
}

#[test]
fn missing_sslrootcert_file() {
    let text = replace(
        VALID,
        "port = 5433",
        "port = 5433\nsslmode = \"verify-full\"\nsslrootcert = \"/nonexistent/ca.pem\"",
    );
    expect_problem(&text, &[], "endpoints.standby_1.sslrootcert");
}

#[test]
fn weight_zero() {
    let text = replace(VALID, "port = 5433", "port = 5433\nweight = 0");
    expect_problem(&text, &[], "endpoints.standby_1.weight");
}

#[test]
fn cluster_name_with_capitals() {
    let text = replace(VALID, "port = 5433", "port = 5433\ncluster = \"Tenant\"");
    expect_problem(&text, &[], "endpoints.standby_1.cluster");
}

#[test]
fn unknown_read_policy() {
    let text = format!("{VALID}\n[router]\nread_policy = \"random\"\n");
    let message = expect_problem(&text, &[], "router.read_policy");
    assert!(message.contains("\"least_outstanding\""), "{message}");
}

#[test]
fn router_queue_capacity_zero() {
    let text = format!("{VALID}\n[router]\nqueue_capacity = 0\n");
    expect_problem(&text, &[], "router.queue_capacity");
}

#[test]
fn supervisor_max_restarts_zero() {
    let text = format!("{VALID}\n[supervisor]\nmax_restarts = 0\n");
    expect_problem(&text, &[], "supervisor.max_restarts");
}

#[test]
fn supervisor_backoff_max_below_initial() {
    let text = format!("{VALID}\n[supervisor]\nbackoff_initial = \"2s\"\nbackoff_max = \"1s\"\n");
    expect_problem(&text, &[], "supervisor.backoff_max");
}

#[test]
fn health_and_failover_sections_load_and_the_environment_overrides_them() {
    let text = format!(
        "{VALID}\n[health]\ninterval = \"1s\"\ntimeout = \"200ms\"\nfailures_to_down = 5\n\
         \n[failover]\nmode = \"manual\"\nfailback = \"automatic\"\npromote_timeout = \"30s\"\n"
    );
    let settings = Fixture::new()
        .load_env(&text, &[("PGHERD_FAILOVER__MODE", "promote")])
        .expect("valid settings");
    assert_eq!(settings.health.interval, Duration::from_secs(1));
    assert_eq!(settings.health.timeout, Duration::from_millis(200));
    assert_eq!(settings.health.failures_to_down, 5);
    assert_eq!(settings.health.successes_to_up, 2, "the documented default");
    assert_eq!(
        settings.failover.mode,
        pgherd::settings::FailoverMode::Promote
    );
    assert_eq!(
        settings.failover.failback,
        pgherd::settings::FailbackMode::Automatic
    );
    assert_eq!(settings.failover.promote_timeout, Duration::from_secs(30));
}

#[test]
fn unknown_failover_mode() {
    let text = format!("{VALID}\n[failover]\nmode = \"auto\"\n");
    let message = expect_problem(&text, &[], "failover.mode");
    for accepted in ["\"follow\"", "\"promote\"", "\"backup\"", "\"manual\""] {
        assert!(message.contains(accepted), "{message}");
    }
}

#[test]
fn unknown_failback_mode() {
    let text = format!("{VALID}\n[failover]\nfailback = \"sometimes\"\n");
    let message = expect_problem(&text, &[], "failover.failback");
    assert!(message.contains("\"manual\""), "{message}");
}

#[test]
fn backup_mode_without_a_backup_endpoint() {
    let text = format!("{VALID}\n[failover]\nmode = \"backup\"\n");
    let message = expect_problem(&text, &[], "failover.mode");
    assert!(message.contains("role = \"backup\""), "{message}");
}

#[test]
fn promote_timeout_below_a_second() {
    let text = format!("{VALID}\n[failover]\npromote_timeout = \"500ms\"\n");
    let message = expect_problem(&text, &[], "failover.promote_timeout");
    assert!(message.contains("\"500ms\""), "{message}");
}

#[test]
fn health_failures_to_down_zero() {
    let text = format!("{VALID}\n[health]\nfailures_to_down = 0\n");
    expect_problem(&text, &[], "health.failures_to_down");
}

#[test]
fn health_successes_to_up_zero() {
    let text = format!("{VALID}\n[health]\nsuccesses_to_up = 0\n");
    expect_problem(&text, &[], "health.successes_to_up");
}

#[test]
fn health_interval_longer_than_a_day() {
    let text = format!("{VALID}\n[health]\ninterval = \"25h\"\n");
    let message = expect_problem(&text, &[], "health.interval");
    assert!(message.contains("longer than a day"), "{message}");
}

#[test]
fn health_timeout_without_a_unit() {
    let text = format!("{VALID}\n[health]\ntimeout = \"300\"\n");
    expect_problem(&text, &[], "health.timeout");
}

#[test]
fn health_timeout_zero() {
    let text = format!("{VALID}\n[health]\ntimeout = \"0s\"\n");
    expect_problem(&text, &[], "health.timeout");
}

#[test]
fn unknown_key_in_the_health_section() {
    let text = format!("{VALID}\n[health]\nintervall = \"1s\"\n");
    expect_problem(&text, &[], "health.intervall");
}

// ----- The replicator's settings. -----

#[test]
fn replicator_tables_without_a_replica_are_refused() {
    let text = format!("{VALID}\n[replicator]\ntables = [\"accounts\"]\n");
    let message = expect_problem(&text, &[], "replicator.tables");
    assert!(message.contains("role = \"replica\""), "{message}");
}

#[test]
fn replicator_targets_must_be_replicas_and_tables_names() {
    let text = format!(
        "{VALID}\n[replicator]\ntables = [\"a.b.c\"]\ntargets = [\"standby_1\", \"nowhere\"]\n"
    );
    let message = expect_problem(&text, &[], "replicator.tables[0]");
    assert!(message.contains("not a table name"), "{message}");
    let message = expect_problem(&text, &[], "replicator.targets[0]");
    assert!(message.contains("role = \"standby\""), "{message}");
    let message = expect_problem(&text, &[], "replicator.targets[1]");
    assert!(message.contains("is not an endpoint"), "{message}");
}

#[test]
fn replicator_mode_and_timings_are_checked() {
    let text = format!("{VALID}\n[replicator]\nmode = \"wal2json\"\n");
    let message = expect_problem(&text, &[], "replicator.mode");
    assert!(message.contains("\"trigger\""), "{message}");
    let text = format!(
        "{VALID}\n[replicator]\npoll_interval = \"0s\"\npoll_after_changes = \"25h\"\nbatch_rows = 0\n"
    );
    expect_problem(&text, &[], "replicator.poll_interval");
    expect_problem(&text, &[], "replicator.poll_after_changes");
    expect_problem(&text, &[], "replicator.batch_rows");
    // The capture triggers' names must fit PostgreSQL's 63 bytes.
    let long = "s".repeat(47);
    let text = format!("{VALID}\n[replicator]\nschema = \"{long}\"\n");
    let message = expect_problem(&text, &[], "replicator.schema");
    assert!(message.contains("at most 46"), "{message}");
}

#[test]
fn replicator_settings_load_and_targets_default_to_the_replicas() {
    let text = format!(
        "{VALID}\n[endpoints.reporting]\nrole = \"replica\"\nhost = \"127.0.0.1\"\nport = 5440\n\
         dbname = \"app\"\nuser = \"app\"\n\n[replicator]\nmode = \"logical\"\n\
         tables = [\"accounts\", \"shop.orders\"]\npoll_interval = \"20ms\"\n"
    );
    let settings = Fixture::new().load(&text).expect("valid");
    assert_eq!(
        settings.replicator.poll_after_changes,
        std::time::Duration::from_millis(10),
        "the default"
    );
    assert!(settings.replicator.logical_stream, "streams by default");
    let peeking = Fixture::new()
        .load(&format!("{text}logical_stream = false\n"))
        .expect("valid");
    assert!(!peeking.replicator.logical_stream);
    assert_eq!(
        settings.replicator.mode,
        pgherd::settings::CaptureMode::Logical
    );
    let targets: Vec<&str> = settings
        .replication_targets()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert_eq!(targets, ["reporting"]);
}
