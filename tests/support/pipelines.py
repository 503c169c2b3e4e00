"""Pipeline files written by RELION 5.0, 4.0 and 3.1 (verbatim), for the pipeline tests."""

RELION5 = """
# version 50001

data_pipeline_general

_rlnPipeLineJobCounter                      13


# version 50001

data_pipeline_processes

loop_
_rlnPipeLineProcessName #1
_rlnPipeLineProcessAlias #2
_rlnPipeLineProcessTypeLabel #3
_rlnPipeLineProcessStatusLabel #4
Refine3D/job010/       None relion.refine3d  Succeeded
DynaMight/job012/ DynaMight/flex/ dynamight    Running


# version 50001

data_pipeline_nodes

loop_
_rlnPipeLineNodeName #1
_rlnPipeLineNodeTypeLabel #2
_rlnPipeLineNodeTypeLabelDepth #3
Refine3D/job010/run_data.star ParticleGroupMetadata.star.relion.refine3d            1
Refine3D/job010/run_class001.mrc DensityMap.mrc.relion.refine3d            1


# version 50001

data_pipeline_input_edges

loop_
_rlnPipeLineEdgeFromNode #1
_rlnPipeLineEdgeProcess #2
Refine3D/job010/run_data.star DynaMight/job012/
Refine3D/job010/run_class001.mrc DynaMight/job012/


# version 50001

data_pipeline_output_edges

loop_
_rlnPipeLineEdgeProcess #1
_rlnPipeLineEdgeToNode #2
Refine3D/job010/ Refine3D/job010/run_data.star
Refine3D/job010/ Refine3D/job010/run_class001.mrc
"""

RELION4 = """
# version 30001

data_pipeline_general

_rlnPipeLineJobCounter                       3


# version 30001

data_pipeline_processes

loop_
_rlnPipeLineProcessName #1
_rlnPipeLineProcessAlias #2
_rlnPipeLineProcessTypeLabel #3
_rlnPipeLineProcessStatusLabel #4
Refine3D/job002/       None relion.refine3d  Succeeded


# version 30001

data_pipeline_nodes

loop_
_rlnPipeLineNodeName #1
_rlnPipeLineNodeTypeLabel #2
Refine3D/job002/run_data.star ParticlesData.star.relion.refine3d


# version 30001

data_pipeline_output_edges

loop_
_rlnPipeLineEdgeProcess #1
_rlnPipeLineEdgeToNode #2
Refine3D/job002/ Refine3D/job002/run_data.star
"""

# What Debian's relion_pipeliner 3.1.3 wrote for an External job (checked on this machine).
RELION31 = """
# version 30001

data_pipeline_general

_rlnPipeLineJobCounter                       2


# version 30001

data_pipeline_processes

loop_
_rlnPipeLineProcessName #1
_rlnPipeLineProcessAlias #2
_rlnPipeLineProcessType #3
_rlnPipeLineProcessStatus #4
External/job001/       None           99            2


# version 30001

data_pipeline_nodes

loop_
_rlnPipeLineNodeName #1
_rlnPipeLineNodeType #2
    p.star            3
External/job001/out.mrc            6


# version 30001

data_pipeline_input_edges

loop_
_rlnPipeLineEdgeFromNode #1
_rlnPipeLineEdgeProcess #2
    p.star External/job001/


# version 30001

data_pipeline_output_edges

loop_
_rlnPipeLineEdgeProcess #1
_rlnPipeLineEdgeToNode #2
External/job001/ External/job001/out.mrc
"""
