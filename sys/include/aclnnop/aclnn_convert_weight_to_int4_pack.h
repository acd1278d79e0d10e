/*
 * aclnn-sys: aclnnConvertWeightToINT4Pack, written from shared/docs/int4pack.md section 1.2.
 */
#ifndef ACLNN_SYS_ACLNN_CONVERT_WEIGHT_TO_INT4_PACK_H
#define ACLNN_SYS_ACLNN_CONVERT_WEIGHT_TO_INT4_PACK_H

#include "aclnn/aclnn_base.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Phase 1. Does all the work on the host; never writes *workspaceSize or *executor. */
aclnnStatus aclnnConvertWeightToINT4PackGetWorkspaceSize(const aclTensor *weight,
                                                         aclTensor *weightInt4Pack,
                                                         uint64_t *workspaceSize,
                                                         aclOpExecutor **executor);
/* Phase 2. Ignores its arguments and returns success. */
aclnnStatus aclnnConvertWeightToINT4Pack(void *workspace, uint64_t workspaceSize,
                                         aclOpExecutor *executor, aclrtStream stream);

#ifdef __cplusplus
}
#endif

#endif
