################################################################################
#
# pocket-powerd
#
################################################################################

$(eval $(call pocketos-daemon,POCKET_POWERD,powerd))

# The board descriptions (clusters, devfreq devices, sensors) a
# configuration names with `board = "/etc/pocketos/boards/<name>.toml"`.
define POCKET_POWERD_INSTALL_BOARDS
	$(INSTALL) -D -m 0644 -t $(TARGET_DIR)/etc/pocketos/boards \
		$(@D)/daemons/powerd/boards/*.toml
endef
POCKET_POWERD_POST_INSTALL_TARGET_HOOKS += POCKET_POWERD_INSTALL_BOARDS

$(eval $(cargo-package))
