################################################################################
#
# pocket-otad
#
################################################################################

$(eval $(call pocketos-daemon,POCKET_OTAD,otad))

# The device description (slots, bootloader) comes from the board's
# rootfs overlay; the example is for reference beside it.
define POCKET_OTAD_INSTALL_SYSTEM_EXAMPLE
	$(INSTALL) -D -m 0644 $(@D)/daemons/otad/system.toml.example \
		$(TARGET_DIR)/usr/share/pocketos/system.toml.example
endef
POCKET_OTAD_POST_INSTALL_TARGET_HOOKS += POCKET_OTAD_INSTALL_SYSTEM_EXAMPLE

$(eval $(cargo-package))
