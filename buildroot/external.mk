# PocketOS's packages all build one source. By default it is the checkout
# this tree lives in (Buildroot's local site method): each package rsyncs it
# without target/, output/ and .git, and vendors its crates from Cargo.lock
# before it builds, into Buildroot's cargo home, where later builds find
# them. So a build of any commit builds that commit, with no pin to keep
# up. A release pins a commit instead: buildroot/bump.sh COMMIT sets
# POCKETOS_VERSION and, in every PocketOS package's .hash, the sha256 of the
# tarball Buildroot makes of it (git, then cargo vendoring), and the
# packages then fetch that tarball.
POCKETOS_VERSION =
POCKETOS_LICENSE = Apache-2.0
POCKETOS_LICENSE_FILES = LICENSE
ifeq ($(POCKETOS_VERSION),)
POCKETOS_SITE = $(realpath $(BR2_EXTERNAL_POCKETOS_PATH)/..)
POCKETOS_SITE_METHOD = local
else
POCKETOS_SITE = https://github.com/pocketos/pocketos.git
POCKETOS_SITE_METHOD = git
POCKETOS_SOURCE = pocketos-$(POCKETOS_VERSION)-git4-cargo5.tar.gz
endif

# The source every PocketOS package builds, for the package whose
# upper-case name is $(1): $(eval $(call pocketos-source,POCKET_MODELD)).
define pocketos-source
$(1)_SITE = $$(POCKETOS_SITE)
$(1)_SITE_METHOD = $$(POCKETOS_SITE_METHOD)
$(1)_LICENSE = $$(POCKETOS_LICENSE)
$(1)_LICENSE_FILES = $$(POCKETOS_LICENSE_FILES)
ifeq ($(POCKETOS_SITE_METHOD),local)
$(1)_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS = \
	--exclude=/target --exclude=/output --exclude=/fuzz/target
$(1)_PRE_CONFIGURE_HOOKS += POCKETOS_CARGO_VENDOR
else
$(1)_VERSION = $$(POCKETOS_VERSION)
$(1)_SOURCE = $$(POCKETOS_SOURCE)
$(1)_DL_SUBDIR = pocketos
endif
endef

# A checkout's crates, vendored as Buildroot's cargo download step does for
# a tarball, once host-rustc is built: the build then runs --offline.
define POCKETOS_CARGO_VENDOR
	mkdir -p $(@D)/.cargo $(BR_CARGO_HOME)
	cd $(@D) && $(HOST_MAKE_ENV) CARGO_HOME=$(BR_CARGO_HOME) \
		flock $(BR_CARGO_HOME)/.br-lock \
		cargo vendor --manifest-path Cargo.toml --locked VENDOR \
		>$(@D)/.cargo/config.toml
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
