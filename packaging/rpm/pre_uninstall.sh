# Kloigos %preun: %systemd_preun written out: on erase (not upgrade), disable and stop.
if [ "$1" -eq 0 ]; then
	# Units that still exist lose their CPU pinning and limits with the generator (%postun's
	# daemon-reload) and their port fence at the next reboot: see packaging/debian/prerm.
	units=0
	if [ -r /etc/kloigos/host.json ]; then
		units=$(grep -c '"compute_id"' /etc/kloigos/host.json || :)
	fi
	if [ "${units:-0}" -gt 0 ]; then
		echo "kloigos: $units compute unit(s) still exist on this host; without the package their CPU pinning and limits are lifted now and their port fence at the next reboot or nftables restart. Run 'kloigos decommission HOSTNAME' before removing Kloigos, or reinstall it to restore them." >&2
	fi
	systemctl --no-reload disable --now kloigos.socket kloigos.service kloigos-nftables.service kloigos-pull.timer kloigos-pull.service >/dev/null 2>&1 || :
	rm -f /etc/systemd/system/timers.target.wants/kloigos-pull.timer
fi
