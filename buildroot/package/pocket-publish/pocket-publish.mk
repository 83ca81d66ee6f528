################################################################################
#
# pocket-publish
#
################################################################################

$(eval $(call pocketos-source,POCKET_PUBLISH))
POCKET_PUBLISH_SUBDIR = cli/pocket-publish

$(eval $(host-cargo-package))
