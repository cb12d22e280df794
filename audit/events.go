package audit

// EventType names what a record is about. Packages that only log (crypto,
// gateway) put the type in their log record's "event" attribute; Handler
// turns such records into audit records.
type EventType string

// The event types on the trail (FORMAT.md lists what each carries).
const (
	EvGatewayStart EventType = "gateway_start"
	EvGatewayStop  EventType = "gateway_stop"
	// An upgrade in place (SIGUSR2): the old gateway handed its listeners
	// and connections to a new one, or failed to and serves on.
	EvGatewayUpgrade       EventType = "gateway_upgrade"
	EvGatewayUpgradeFailed EventType = "gateway_upgrade_failed"
	EvAttach               EventType = "attach"
	EvAttachRefused        EventType = "attach_refused"
	EvDetach               EventType = "detach"
	EvSessionRevoked       EventType = "session_revoked"
	EvTLSFailure           EventType = "tls_failure"
	EvPolicyLoad           EventType = "policy_load"
	EvPolicyReload         EventType = "policy_reload"
	EvPolicyReloadFailed   EventType = "policy_reload_failed"
	EvVolumeCreate         EventType = "volume_create"
	EvVolumeImport         EventType = "volume_import"
	EvVolumeExport         EventType = "volume_export"
	EvVolumeShred          EventType = "volume_shred"
	EvVolumeUpgrade        EventType = "volume_upgrade"
	EvVolumeDelete         EventType = "volume_delete"
	EvVolumeResize         EventType = "volume_resize"
	EvVolumeLabel          EventType = "volume_label"
	EvVolumeAdopt          EventType = "volume_adopt"
	EvVolumeRelease        EventType = "volume_release"
	EvLeaseBroken          EventType = "lease_broken"
	EvLeaseLost            EventType = "lease_lost"
	EvKeyCreate            EventType = "key_create"
	EvKeyRotate            EventType = "key_rotate"
	EvRekeyStart           EventType = "rekey_start"
	EvRekeyProgress        EventType = "rekey_progress"
	EvRekeyFinish          EventType = "rekey_finish"
	EvSnapshotCreate       EventType = "snapshot_create"
	EvSnapshotDelete       EventType = "snapshot_delete"
	EvVolumeBackup         EventType = "volume_backup"
	EvVolumeRestore        EventType = "volume_restore"
	EvVolumeClone          EventType = "volume_clone"
	EvIntegrityFailure     EventType = "integrity_failure"
	EvIntegrityWarning     EventType = "integrity_warning"
	EvVaultUnreachable     EventType = "vault_unreachable"
	EvVaultBack            EventType = "vault_back"
	EvAuditRecovered       EventType = "audit_recovered"
	EvBackingOutage        EventType = "backing_outage"
	EvBackingRestored      EventType = "backing_restored"
	EvIOError              EventType = "io_error"
	EvCheckpoint           EventType = "checkpoint"
)
