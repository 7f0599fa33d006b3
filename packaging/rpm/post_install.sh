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
	systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ]; then
	# %systemd_post: first installation, apply presets (50-kloigos.preset enables the socket).
	systemctl --no-reload preset kloigos.socket kloigos-nftables.service >/dev/null 2>&1 || :
	if [ -d /run/systemd/system ]; then
		systemctl start kloigos.socket >/dev/null 2>&1 || :
	fi
fi
if [ -d /run/systemd/system ]; then
	# Active from installation on, so PartOf=nftables.service restores the fence after an
	# nftables restart; also restores a table rendered before (reinstall).
	systemctl start kloigos-nftables.service >/dev/null 2>&1 || :
fi
