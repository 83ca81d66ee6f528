################################################################################
#
# pocketctl
#
################################################################################

$(eval $(call pocketos-source,POCKETCTL))
POCKETCTL_SUBDIR = cli/pocketctl

$(eval $(cargo-package))
