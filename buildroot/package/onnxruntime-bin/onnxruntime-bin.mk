################################################################################
#
# onnxruntime-bin
#
################################################################################

# The version and wheel daemons/npud/onnxruntime.lock pins for the image.
ONNXRUNTIME_BIN_VERSION = 1.31.1
ONNXRUNTIME_BIN_SITE = https://files.pythonhosted.org/packages/cp311/o/onnxruntime
ONNXRUNTIME_BIN_SOURCE = onnxruntime-$(ONNXRUNTIME_BIN_VERSION)-cp311-cp311-manylinux_2_28_aarch64.whl
ONNXRUNTIME_BIN_LICENSE = MIT
ONNXRUNTIME_BIN_LICENSE_FILES = \
	onnxruntime/LICENSE \
	onnxruntime/ThirdPartyNotices.txt

# A wheel is a zip archive: only the library and its licenses are needed.
define ONNXRUNTIME_BIN_EXTRACT_CMDS
	$(UNZIP) -d $(@D) $(ONNXRUNTIME_BIN_DL_DIR)/$(ONNXRUNTIME_BIN_SOURCE) \
		'onnxruntime/capi/libonnxruntime*.so*' \
		onnxruntime/LICENSE \
		onnxruntime/ThirdPartyNotices.txt
endef

define ONNXRUNTIME_BIN_INSTALL_TARGET_CMDS
	$(INSTALL) -D -m 0755 \
		$(@D)/onnxruntime/capi/libonnxruntime.so.$(ONNXRUNTIME_BIN_VERSION) \
		$(TARGET_DIR)/usr/lib/libonnxruntime.so.$(ONNXRUNTIME_BIN_VERSION)
	$(INSTALL) -D -m 0755 \
		$(@D)/onnxruntime/capi/libonnxruntime_providers_shared.so \
		$(TARGET_DIR)/usr/lib/libonnxruntime_providers_shared.so
	ln -sf libonnxruntime.so.$(ONNXRUNTIME_BIN_VERSION) \
		$(TARGET_DIR)/usr/lib/libonnxruntime.so.1
	ln -sf libonnxruntime.so.$(ONNXRUNTIME_BIN_VERSION) \
		$(TARGET_DIR)/usr/lib/libonnxruntime.so
endef

$(eval $(generic-package))
