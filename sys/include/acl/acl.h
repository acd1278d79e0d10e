/*
 * aclnn-sys: process-level ACL entry points, written from shared/docs/abi.md section 5.2.
 */
#ifndef ACLNN_SYS_ACL_H
#define ACLNN_SYS_ACL_H

#include "acl/acl_rt.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Initialises ACL once per process; configPath may be NULL. */
aclError aclInit(const char *configPath);
aclError aclFinalize(void);

#ifdef __cplusplus
}
#endif

#endif
