# PocketOS's packages all build one source: the PocketOS repository at
# POCKETOS_VERSION, fetched with git and its crates vendored by Buildroot's
# cargo download step, so the build itself runs offline. Each package's
# .hash holds the sha256 of that one tarball. buildroot/bump.sh [COMMIT]
# re-pins both, with Buildroot's own download scripts; a build of the
# checkout this tree is in runs it for HEAD first (see README.md).
POCKETOS_VERSION = 199d48cc808ed9a65d8871193300bbc90ec3575d
POCKETOS_SITE = https://github.com/pocketos/pocketos.git
POCKETOS_SITE_METHOD = git
POCKETOS_SOURCE = pocketos-$(POCKETOS_VERSION)-git4-cargo5.tar.gz
POCKETOS_LICENSE = Apache-2.0
POCKETOS_LICENSE_FILES = LICENSE

# The source every PocketOS package builds, for the package whose
# upper-case name is $(1): $(eval $(call pocketos-source,POCKET_MODELD)).
define pocketos-source
$(1)_VERSION = $$(POCKETOS_VERSION)
$(1)_SITE = $$(POCKETOS_SITE)
$(1)_SITE_METHOD = $$(POCKETOS_SITE_METHOD)
$(1)_SOURCE = $$(POCKETOS_SOURCE)
$(1)_DL_SUBDIR = pocketos
$(1)_LICENSE = $$(POCKETOS_LICENSE)
$(1)_LICENSE_FILES = $$(POCKETOS_LICENSE_FILES)
endef

# A daemon package, for the package whose upper-case name is $(1) and
# whose daemon is $(2) (daemons/$(2) in the source):
# $(eval $(call pocketos-daemon,POCKET_MODELD,modeld)).
define pocketos-daemon
$(call pocketos-source,$(1))
$(1)_SUBDIR = daemons/$(2)
$(1)_DEPENDENCIES = dbus
$(1)_DAEMON = $(2)
$(1)_POST_INSTALL_TARGET_HOOKS += POCKETOS_INSTALL_DAEMON_DATA
$(1)_INSTALL_INIT_SYSV = $$(POCKETOS_INSTALL_INIT_SYSV)
$(1)_INSTALL_INIT_SYSTEMD = $$(POCKETOS_INSTALL_INIT_SYSTEMD)
endef

# The data each daemon package installs beside its binary: its bus policy
# (the dashboard owns no bus name, so has none),
# the commented example configuration as /etc/pocketos/<daemon>.toml (a
# board's rootfs overlay replaces it), and the init-script helper. $(PKG)
# is the package being installed and $($(PKG)_DAEMON) its daemon.
define POCKETOS_INSTALL_DAEMON_DATA
	for conf in $(@D)/daemons/$($(PKG)_DAEMON)/data/*.conf; do \
		[ ! -e "$$conf" ] || $(INSTALL) -D -m 0644 -t \
			$(TARGET_DIR)/usr/share/dbus-1/system.d "$$conf" || exit 1; \
	done
	$(INSTALL) -D -m 0644 $(@D)/daemons/$($(PKG)_DAEMON)/$($(PKG)_DAEMON).toml.example \
		$(TARGET_DIR)/etc/pocketos/$($(PKG)_DAEMON).toml
	$(INSTALL) -D -m 0644 $(@D)/crates/pocket-daemon/data/pocket-service \
		$(TARGET_DIR)/usr/libexec/pocketos/pocket-service
endef

# BusyBox or SysV init: the daemon's /etc/init.d script.
define POCKETOS_INSTALL_INIT_SYSV
	$(INSTALL) -D -m 0755 -t $(TARGET_DIR)/etc/init.d \
		$(@D)/daemons/$($(PKG)_DAEMON)/data/S*
endef

# systemd: the daemon's unit.
define POCKETOS_INSTALL_INIT_SYSTEMD
	$(INSTALL) -D -m 0644 -t $(TARGET_DIR)/usr/lib/systemd/system \
		$(@D)/daemons/$($(PKG)_DAEMON)/data/*.service
endef

include $(sort $(wildcard $(BR2_EXTERNAL_POCKETOS_PATH)/package/*/*.mk))
