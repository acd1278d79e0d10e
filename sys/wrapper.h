/* bindgen input: the ACL runtime, nnopbase and the operators this project binds. */
#include "acl/acl.h"
#include "aclnn/aclnn_base.h"
#include "aclnnop/aclnn_convert_weight_to_int4_pack.h"
#include "aclnnop/aclnn_weight_quant_batch_matmul_v2.h"
