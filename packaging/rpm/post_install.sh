# Kloigos %post: systemd's RPM macros written out (%sysusers_create_package,
# %tmpfiles_create_package, %systemd_post), then enabling per the shipped preset.
if [ -x /usr/bin/systemd-sysusers ]; then
	systemd-sysusers /usr/lib/sysusers.d/kloigos.conf || :
elif ! getent group kloigos >/dev/null; then
	groupadd -r kloigos || :
fi
if [ -x /usr/bin/systemd-tmpfiles ]; then
	systemd-tmpfiles --create /usr/lib/tmpfiles.d/kloigos.conf || :
fi
if [ -d /run/systemd/system ]; then
	# Also runs the generator (/usr/lib/systemd/system-generators/kloigos-generator) over
	# /etc/kloigos/host.json: the units' drop-ins in /run/systemd/generator.
	systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ]; then
	# %systemd_post: first installation, apply presets (50-kloigos.preset enables the socket).
	systemctl --no-reload preset kloigos.socket kloigos-nftables.service >/dev/null 2>&1 || :
	if [ -d /run/systemd/system ]; then
		systemctl start kloigos.socket >/dev/null 2>&1 || :
	fi
elif [ -d /run/systemd/system ]; then
	# Upgrade: here, in the new package's %post, because on an upgrade %postun is the old
	# package's. The new service runs once even if it was idle: its start-up reconcile (before
	# READY=1, so this waits for it) writes /etc/kloigos/host.json, removes the drop-ins that
	# versions without a generator wrote to /etc/systemd/system and reloads systemd; the old
	# drop-ins stay loaded until that reload, so every unit keeps its limits throughout.
	systemctl restart kloigos.service >/dev/null 2>&1 ||
		echo "kloigos: kloigos.service did not start after the upgrade (journalctl -u kloigos.service); the units keep their current limits" >&2
	systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
	# Active from installation on, so PartOf=nftables.service restores the fence after an
	# nftables restart; also restores a table rendered before (reinstall).
	systemctl start kloigos-nftables.service >/dev/null 2>&1 || :
fi
